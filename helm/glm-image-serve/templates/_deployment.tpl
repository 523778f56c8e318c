{{/*
The Deployment of one stage: dict "root" (chart context) and "component" (planner|decoder|gateway).
The three deployment-<component>.yaml files call it; what differs between stages is the argument
list (glm-image-serve.args) and whether the pod mounts the model (planner and decoder).
*/}}

{{- define "glm-image-serve.tlsDir" -}}/etc/glm-image-serve/tls{{- end }}
{{- define "glm-image-serve.caDir" -}}/etc/glm-image-serve/ca{{- end }}
{{- define "glm-image-serve.stageCADir" -}}/etc/glm-image-serve/stage-ca{{- end }}
{{- define "glm-image-serve.stageClientDir" -}}/etc/glm-image-serve/stage-client{{- end }}
{{- define "glm-image-serve.apiKeysDir" -}}/etc/glm-image-serve/api-keys{{- end }}

{{/* Does this stage (the gateway) serve the OpenAI-compatible HTTP API? */}}
{{- define "glm-image-serve.http" -}}
{{- if eq .component "gateway" }}{{ if .root.Values.gateway.http.enabled }}true{{ end }}{{ end }}
{{- end }}

{{/* Does this stage load the model? */}}
{{- define "glm-image-serve.usesModel" -}}
{{- if ne .component "gateway" }}true{{ end }}
{{- end }}

{{/* Is TLS on between the gateway and the two stages (`tls.enabled`)? Takes the chart context. */}}
{{- define "glm-image-serve.stageTLS" -}}
{{- $tls := .Values.tls }}
{{- if and $tls.mutual (not $tls.enabled) }}
{{- fail "tls.mutual needs tls.enabled: client certificates are checked on TLS connections only" }}
{{- end }}
{{- if $tls.enabled }}true{{ end }}
{{- end }}

{{/* Mutual TLS: planner and decoder require a client certificate (`tls.mutual`). Takes the chart context. */}}
{{- define "glm-image-serve.mutualTLS" -}}
{{- if and (include "glm-image-serve.stageTLS" .) .Values.tls.mutual }}true{{ end }}
{{- end }}

{{/* Does this stage serve TLS? planner and decoder: `tls.enabled`; the gateway's public listener: `gateway.tls.enabled`. */}}
{{- define "glm-image-serve.servesTLS" -}}
{{- if eq .component "gateway" }}
{{- if .root.Values.gateway.tls.enabled }}true{{ end }}
{{- else if include "glm-image-serve.stageTLS" .root }}true{{ end }}
{{- end }}

{{/* The existing Secret named for this stage's serving certificate ("" = none named). */}}
{{- define "glm-image-serve.existingTLSSecret" -}}
{{- if eq .component "gateway" }}
{{- .root.Values.gateway.tls.secretName }}
{{- else }}
{{- (index .root.Values.tls .component).secretName }}
{{- end }}
{{- end }}

{{/* Does the chart issue this stage's serving certificate with cert-manager? */}}
{{- define "glm-image-serve.issuesServingCert" -}}
{{- if and (include "glm-image-serve.servesTLS" .) .root.Values.tls.certManager.enabled (not (include "glm-image-serve.existingTLSSecret" .)) }}true{{ end }}
{{- end }}

{{/* Secret of this stage's serving certificate: the one named in values, else the chart's Certificate's. */}}
{{- define "glm-image-serve.tlsSecretName" -}}
{{- $existing := include "glm-image-serve.existingTLSSecret" . }}
{{- if $existing }}
{{- $existing }}
{{- else if .root.Values.tls.certManager.enabled }}
{{- printf "%s-tls" (include "glm-image-serve.componentName" .) }}
{{- else if eq .component "gateway" }}
{{- fail "gateway.tls.secretName is required when gateway.tls.enabled (or enable tls.certManager to issue it)" }}
{{- else }}
{{- fail (printf "tls.%s.secretName is required when tls.enabled (or enable tls.certManager to issue it)" .component) }}
{{- end }}
{{- end }}

{{/* Does the chart issue the gateway's client certificate (mutual TLS) with cert-manager? Takes the chart context. */}}
{{- define "glm-image-serve.issuesClientCert" -}}
{{- if and (include "glm-image-serve.mutualTLS" .) .Values.tls.certManager.enabled (not .Values.tls.gatewayClient.secretName) }}true{{ end }}
{{- end }}

{{/* Secret of the gateway's client certificate (mutual TLS). Takes the chart context. */}}
{{- define "glm-image-serve.clientSecretName" -}}
{{- if .Values.tls.gatewayClient.secretName }}
{{- .Values.tls.gatewayClient.secretName }}
{{- else if .Values.tls.certManager.enabled }}
{{- printf "%s-client-tls" (include "glm-image-serve.componentName" (dict "root" . "component" "gateway")) }}
{{- else }}
{{- fail "tls.gatewayClient.secretName is required when tls.mutual (or enable tls.certManager to issue it)" }}
{{- end }}
{{- end }}

{{/* CA file a planner or decoder pod trusts (client certificates, its own probes). */}}
{{- define "glm-image-serve.caFile" -}}
{{- if .root.Values.tls.ca.secretName }}
{{- printf "%s/ca.crt" (include "glm-image-serve.caDir" .) }}
{{- else }}
{{- printf "%s/ca.crt" (include "glm-image-serve.tlsDir" .) }}
{{- end }}
{{- end }}

{{/* Secret the gateway takes the stages' CA from: tls.ca, else its client certificate's, else the planner's. */}}
{{- define "glm-image-serve.stageCASecretName" -}}
{{- if .Values.tls.ca.secretName }}
{{- .Values.tls.ca.secretName }}
{{- else if include "glm-image-serve.mutualTLS" . }}
{{- include "glm-image-serve.clientSecretName" . }}
{{- else }}
{{- include "glm-image-serve.tlsSecretName" (dict "root" . "component" "planner") }}
{{- end }}
{{- end }}

{{/* Secret with the gateway's API key digests ("" = no keys: the gateway is open). Takes the chart context. */}}
{{- define "glm-image-serve.apiKeysSecretName" -}}
{{- $keys := .Values.gateway.apiKeys }}
{{- if and $keys.existingSecret $keys.entries }}
{{- fail "gateway.apiKeys: set existingSecret or entries, not both" }}
{{- end }}
{{- if $keys.existingSecret }}
{{- $keys.existingSecret }}
{{- else if $keys.entries }}
{{- printf "%s-api-keys" (include "glm-image-serve.componentName" (dict "root" . "component" "gateway")) }}
{{- else if or (gt (int $keys.requestsPerMinute) 0) (gt (int $keys.maxInFlight) 0) }}
{{- fail "gateway.apiKeys.requestsPerMinute and maxInFlight are per API key: set gateway.apiKeys.existingSecret or entries" }}
{{- end }}
{{- end }}

{{/* DNS name a client verifies this stage's certificate against. */}}
{{- define "glm-image-serve.tlsServerName" -}}
{{- if eq .component "gateway" }}
{{- printf "%s.%s.svc.%s" (include "glm-image-serve.componentName" .) .root.Release.Namespace .root.Values.clusterDomain }}
{{- else }}
{{- include "glm-image-serve.headlessFQDN" . }}
{{- end }}
{{- end }}

{{/* The four names of a stage's Service (<svc>, <svc>.<ns>, <svc>.<ns>.svc, <svc>.<ns>.svc.<domain>), one a line. */}}
{{- define "glm-image-serve.serviceDNSNames" -}}
{{- $service := include "glm-image-serve.headlessName" . }}
{{- if eq .component "gateway" }}
{{- $service = include "glm-image-serve.componentName" . }}
{{- end }}
{{- $namespace := .root.Release.Namespace }}
- {{ $service }}
- {{ $service }}.{{ $namespace }}
- {{ $service }}.{{ $namespace }}.svc
- {{ $service }}.{{ $namespace }}.svc.{{ .root.Values.clusterDomain }}
{{- end }}

{{/* Server flags of a stage, then its own flags, then extraArgs (last, so they win). */}}
{{- define "glm-image-serve.args" -}}
{{- $root := .root }}
{{- $stage := index $root.Values .component }}
{{- if include "glm-image-serve.usesModel" . }}
- --model={{ $root.Values.model.path }}
{{- end }}
- --port={{ $stage.port }}
- --metrics-port={{ $stage.metrics.port }}
- --shutdown-grace-seconds={{ $stage.shutdownGraceSeconds }}
{{- if include "glm-image-serve.servesTLS" . }}
- --tls-cert-file={{ include "glm-image-serve.tlsDir" . }}/tls.crt
- --tls-key-file={{ include "glm-image-serve.tlsDir" . }}/tls.key
{{- end }}
{{- if eq .component "planner" }}
- --engine={{ $stage.engine }}
{{- else if eq .component "decoder" }}
- --device={{ $stage.device }}
{{- end }}
{{- if and (ne .component "gateway") (include "glm-image-serve.mutualTLS" $root) }}
- --tls-client-ca-file={{ include "glm-image-serve.caFile" . }}
{{- end }}
{{- if eq .component "gateway" }}
{{- $planner := dict "root" $root "component" "planner" }}
{{- $decoder := dict "root" $root "component" "decoder" }}
{{- $plannerTargets := $stage.plannerTargets | default (list (printf "dns:///%s:%v" (include "glm-image-serve.headlessFQDN" $planner) $root.Values.planner.port)) }}
{{- $decoderTargets := $stage.decoderTargets | default (list (printf "dns:///%s:%v" (include "glm-image-serve.headlessFQDN" $decoder) $root.Values.decoder.port)) }}
- --planner={{ join "," $plannerTargets }}
- --decoder={{ join "," $decoderTargets }}
{{- if include "glm-image-serve.stageTLS" $root }}
- --stage-tls-ca-file={{ include "glm-image-serve.stageCADir" . }}/ca.crt
{{- end }}
{{- if include "glm-image-serve.mutualTLS" $root }}
- --stage-tls-cert-file={{ include "glm-image-serve.stageClientDir" . }}/tls.crt
- --stage-tls-key-file={{ include "glm-image-serve.stageClientDir" . }}/tls.key
{{- end }}
{{- if include "glm-image-serve.http" . }}
- --http-port={{ $stage.http.port }}
- --served-model-name={{ $stage.http.servedModelName }}
{{- end }}
{{- if include "glm-image-serve.apiKeysSecretName" $root }}
- --api-keys-file={{ include "glm-image-serve.apiKeysDir" . }}/{{ $stage.apiKeys.secretKey }}
{{- if gt (int $stage.apiKeys.requestsPerMinute) 0 }}
- --key-requests-per-minute={{ $stage.apiKeys.requestsPerMinute }}
{{- end }}
{{- if gt (int $stage.apiKeys.maxInFlight) 0 }}
- --key-max-in-flight={{ $stage.apiKeys.maxInFlight }}
{{- end }}
{{- end }}
{{- end }}
{{- range $stage.extraArgs }}
- {{ toString . | quote }}
{{- end }}
{{- end }}

{{/*
One probe: dict "ctx" (root+component) "probe" (its values) "kind" (startup|readiness|liveness).
Native gRPC probes (grpc.health.v1) in plaintext. The kubelet's gRPC probe cannot speak TLS, so a
stage serving TLS is probed by the image's own health client over loopback instead; with mutual
TLS it presents the pod's own certificate (issued for server and client auth) as client certificate.
*/}}
{{- define "glm-image-serve.probe" -}}
{{- $ctx := .ctx }}
{{- $stage := index $ctx.root.Values $ctx.component }}
{{- $probe := .probe }}
{{- if include "glm-image-serve.servesTLS" $ctx }}
exec:
  command:
    - python
    - -m
    - servekit.healthcheck
    - --address=127.0.0.1:{{ $stage.port }}
    - --service={{ $probe.service }}
    {{- if eq $ctx.component "gateway" }}
    - --tls-ca-file={{ include "glm-image-serve.tlsDir" $ctx }}/ca.crt
    {{- else }}
    - --tls-ca-file={{ include "glm-image-serve.caFile" $ctx }}
    {{- end }}
    - --tls-server-name={{ include "glm-image-serve.tlsServerName" $ctx }}
    {{- if and (ne $ctx.component "gateway") (include "glm-image-serve.mutualTLS" $ctx.root) }}
    - --tls-cert-file={{ include "glm-image-serve.tlsDir" $ctx }}/tls.crt
    - --tls-key-file={{ include "glm-image-serve.tlsDir" $ctx }}/tls.key
    {{- end }}
{{- else }}
grpc:
  port: {{ $stage.port }}
  {{- if $probe.service }}
  service: {{ $probe.service | quote }}
  {{- end }}
{{- end }}
periodSeconds: {{ $probe.periodSeconds }}
timeoutSeconds: {{ $probe.timeoutSeconds }}
failureThreshold: {{ $probe.failureThreshold }}
{{- if eq .kind "readiness" }}
successThreshold: {{ $probe.successThreshold | default 1 }}
{{- end }}
{{- end }}

{{/* The volume that holds the model (planner and decoder). */}}
{{- define "glm-image-serve.modelVolume" -}}
{{- $model := .Values.model }}
- name: model
{{- if $model.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ $model.existingClaim }}
    {{- if not $model.download.enabled }}
    readOnly: true
    {{- end }}
{{- else if $model.hostPath }}
  hostPath:
    path: {{ $model.hostPath }}
    type: {{ ternary "DirectoryOrCreate" "Directory" (and $model.download.enabled true) }}
{{- else if $model.download.enabled }}
  emptyDir:
    sizeLimit: {{ $model.emptyDirSizeLimit }}
{{- else }}
{{- fail "model: set model.existingClaim or model.hostPath to where the checkpoint is, or enable model.download" }}
{{- end }}
{{- end }}

{{/* The init container that fetches the stage's part of the checkpoint with `hf download`. */}}
{{- define "glm-image-serve.modelFetch" -}}
{{- $root := .root }}
{{- $stage := index $root.Values .component }}
{{- $download := $root.Values.model.download }}
{{- $image := include "glm-image-serve.image" . }}
{{- if $download.image.repository }}
{{- $tag := required "model.download.image.tag is required with model.download.image.repository" $download.image.tag | toString }}
{{- if eq $tag "latest" }}
{{- fail "model.download.image.tag: 'latest' is not allowed; pin a version" }}
{{- end }}
{{- $image = printf "%s:%s" $download.image.repository $tag }}
{{- if $download.image.digest }}
{{- $image = printf "%s@%s" $image $download.image.digest }}
{{- end }}
{{- end }}
- name: model-fetch
  image: {{ $image }}
  imagePullPolicy: {{ $stage.image.pullPolicy }}
  command: ["hf"]
  args:
    - download
    - {{ $download.repo }}
    - --revision={{ $download.revision }}
    - --local-dir={{ $root.Values.model.path }}
    {{- range $stage.modelFiles.include }}
    - {{ printf "--include=%s" . | quote }}
    {{- end }}
    {{- range $stage.modelFiles.exclude }}
    - {{ printf "--exclude=%s" . | quote }}
    {{- end }}
  env:
    # The service images run offline; this container is the one place that reaches the hub.
    - name: HF_HUB_OFFLINE
      value: "0"
    - name: HF_HUB_DISABLE_TELEMETRY
      value: "1"
    {{- if $download.tokenSecret.name }}
    - name: HF_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ $download.tokenSecret.name }}
          key: {{ $download.tokenSecret.key }}
    {{- end }}
  {{- with $download.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $stage.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: model
      mountPath: {{ $root.Values.model.mountPath }}
      {{- with $root.Values.model.subPath }}
      subPath: {{ . }}
      {{- end }}
    - name: home
      mountPath: /home/app
    - name: tmp
      mountPath: /tmp
{{- end }}

{{- define "glm-image-serve.deployment" -}}
{{- $root := .root }}
{{- $component := .component }}
{{- $stage := index $root.Values $component }}
{{- $ctx := dict "root" $root "component" $component }}
{{- $usesModel := include "glm-image-serve.usesModel" $ctx }}
{{- /* Checks that a schema cannot express. */}}
{{- $drain := add $stage.preStopSleepSeconds $stage.shutdownGraceSeconds }}
{{- if le (int $stage.terminationGracePeriodSeconds) (int $drain) }}
{{- fail (printf "%s.terminationGracePeriodSeconds (%v) must exceed preStopSleepSeconds + shutdownGraceSeconds (%v), or pods are killed mid-drain" $component $stage.terminationGracePeriodSeconds $drain) }}
{{- end }}
{{- if eq $component "planner" }}
{{- $engineGPUs := include "glm-image-serve.plannerEngineGPUs" $root | int }}
{{- $gpus := include "glm-image-serve.gpuCount" $ctx | int }}
{{- if ne $engineGPUs $gpus }}
{{- fail (printf "planner: nvidia.com/gpu is %d but the vLLM flags in planner.extraArgs need %d GPUs (tensor x pipeline x data parallel size)" $gpus $engineGPUs) }}
{{- end }}
{{- end }}
{{- $mountPath := trimSuffix "/" $root.Values.model.mountPath }}
{{- $modelPath := trimSuffix "/" $root.Values.model.path }}
{{- if and $usesModel (ne $modelPath $mountPath) (not (hasPrefix (printf "%s/" $mountPath) $modelPath)) }}
{{- fail (printf "model.path (%s) must lie under model.mountPath (%s)" $root.Values.model.path $root.Values.model.mountPath) }}
{{- end }}
{{- $servesTLS := include "glm-image-serve.servesTLS" $ctx }}
{{- $tlsSecret := "" }}
{{- if $servesTLS }}
{{- $tlsSecret = include "glm-image-serve.tlsSecretName" $ctx }}
{{- end }}
{{- $isGateway := eq $component "gateway" }}
{{- $stageTLS := and $isGateway (include "glm-image-serve.stageTLS" $root) }}
{{- $clientTLS := and $isGateway (include "glm-image-serve.mutualTLS" $root) }}
{{- $caVolume := and (not $isGateway) $servesTLS $root.Values.tls.ca.secretName }}
{{- $apiKeysSecret := "" }}
{{- if $isGateway }}
{{- $apiKeysSecret = include "glm-image-serve.apiKeysSecretName" $root }}
{{- end }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "glm-image-serve.componentName" $ctx }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "glm-image-serve.labels" $ctx | nindent 4 }}
spec:
  {{- if not $stage.autoscaling.enabled }}
  replicas: {{ $stage.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  minReadySeconds: {{ $stage.minReadySeconds }}
  progressDeadlineSeconds: {{ $stage.progressDeadlineSeconds }}
  strategy:
    {{- toYaml $stage.strategy | nindent 4 }}
  selector:
    matchLabels:
      {{- include "glm-image-serve.selectorLabels" $ctx | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "glm-image-serve.podLabels" $ctx | nindent 8 }}
      {{- with $stage.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      serviceAccountName: {{ include "glm-image-serve.serviceAccountName" $root }}
      automountServiceAccountToken: false
      enableServiceLinks: false
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $stage.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      terminationGracePeriodSeconds: {{ $stage.terminationGracePeriodSeconds }}
      {{- with $stage.podSecurityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $stage.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $stage.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $stage.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $stage.topologySpreadConstraints }}
      topologySpreadConstraints:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- if and $usesModel $root.Values.model.download.enabled }}
      initContainers:
        {{- include "glm-image-serve.modelFetch" $ctx | trim | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ $component }}
          image: {{ include "glm-image-serve.image" $ctx }}
          imagePullPolicy: {{ $stage.image.pullPolicy }}
          args:
            {{- include "glm-image-serve.args" $ctx | trim | nindent 12 }}
          {{- with $stage.extraEnv }}
          env:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- with $stage.envFrom }}
          envFrom:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          ports:
            - name: grpc
              containerPort: {{ $stage.port }}
              protocol: TCP
            - name: metrics
              containerPort: {{ $stage.metrics.port }}
              protocol: TCP
            {{- if include "glm-image-serve.http" $ctx }}
            - name: http
              containerPort: {{ $stage.http.port }}
              protocol: TCP
            {{- end }}
          {{- if $stage.probes.startup.enabled }}
          startupProbe:
            {{- include "glm-image-serve.probe" (dict "ctx" $ctx "probe" $stage.probes.startup "kind" "startup") | trim | nindent 12 }}
          {{- end }}
          readinessProbe:
            {{- include "glm-image-serve.probe" (dict "ctx" $ctx "probe" $stage.probes.readiness "kind" "readiness") | trim | nindent 12 }}
          livenessProbe:
            {{- include "glm-image-serve.probe" (dict "ctx" $ctx "probe" $stage.probes.liveness "kind" "liveness") | trim | nindent 12 }}
          {{- if gt (int $stage.preStopSleepSeconds) 0 }}
          lifecycle:
            preStop:
              exec:
                command: ["sleep", "{{ $stage.preStopSleepSeconds }}"]
          {{- end }}
          {{- with $stage.resources }}
          resources:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- with $stage.securityContext }}
          securityContext:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          volumeMounts:
            - name: home
              mountPath: /home/app
            - name: tmp
              mountPath: /tmp
            {{- if $usesModel }}
            - name: model
              mountPath: {{ $root.Values.model.mountPath }}
              readOnly: true
              {{- with $root.Values.model.subPath }}
              subPath: {{ . }}
              {{- end }}
            {{- end }}
            {{- if and $usesModel $stage.shmSizeLimit }}
            - name: dshm
              mountPath: /dev/shm
            {{- end }}
            # Secrets are mounted as directories (never subPath), so rotated files reach the running
            # services, which reload them.
            {{- if $servesTLS }}
            - name: tls
              mountPath: {{ include "glm-image-serve.tlsDir" $ctx }}
              readOnly: true
            {{- end }}
            {{- if $caVolume }}
            - name: tls-ca
              mountPath: {{ include "glm-image-serve.caDir" $ctx }}
              readOnly: true
            {{- end }}
            {{- if $stageTLS }}
            - name: stage-ca
              mountPath: {{ include "glm-image-serve.stageCADir" $ctx }}
              readOnly: true
            {{- end }}
            {{- if $clientTLS }}
            - name: stage-client
              mountPath: {{ include "glm-image-serve.stageClientDir" $ctx }}
              readOnly: true
            {{- end }}
            {{- if $apiKeysSecret }}
            - name: api-keys
              mountPath: {{ include "glm-image-serve.apiKeysDir" $ctx }}
              readOnly: true
            {{- end }}
            {{- with $stage.extraVolumeMounts }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
      volumes:
        # $HOME (vLLM, torch.compile and Triton caches) and /tmp: the root filesystem is read-only
        - name: home
          emptyDir: {}
        - name: tmp
          emptyDir: {}
        {{- if $usesModel }}
        {{- include "glm-image-serve.modelVolume" $root | trim | nindent 8 }}
        {{- end }}
        {{- if and $usesModel $stage.shmSizeLimit }}
        - name: dshm
          emptyDir:
            medium: Memory
            sizeLimit: {{ $stage.shmSizeLimit }}
        {{- end }}
        {{- if $servesTLS }}
        - name: tls
          secret:
            secretName: {{ $tlsSecret }}
            defaultMode: 0440
        {{- end }}
        {{- if $caVolume }}
        - name: tls-ca
          secret:
            secretName: {{ $root.Values.tls.ca.secretName }}
            defaultMode: 0440
            items:
              - key: {{ $root.Values.tls.ca.key }}
                path: ca.crt
        {{- end }}
        {{- if $stageTLS }}
        - name: stage-ca
          secret:
            secretName: {{ include "glm-image-serve.stageCASecretName" $root }}
            defaultMode: 0440
            items:
              - key: {{ ternary $root.Values.tls.ca.key "ca.crt" (ne $root.Values.tls.ca.secretName "") }}
                path: ca.crt
        {{- end }}
        {{- if $clientTLS }}
        - name: stage-client
          secret:
            secretName: {{ include "glm-image-serve.clientSecretName" $root }}
            defaultMode: 0440
        {{- end }}
        {{- if $apiKeysSecret }}
        - name: api-keys
          secret:
            secretName: {{ $apiKeysSecret }}
            defaultMode: 0440
        {{- end }}
        {{- with $stage.extraVolumes }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
{{- end }}
