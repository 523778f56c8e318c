{{/*
The Deployment of one stage: dict "root" (chart context) and "component" (planner|decoder|gateway).
The three deployment-<component>.yaml files call it; what differs between stages is the argument
list (glm-image-serve.args) and whether the pod mounts the model (planner and decoder).
*/}}

{{- define "glm-image-serve.tlsDir" -}}/etc/glm-image-serve/tls{{- end }}
{{- define "glm-image-serve.stageCADir" -}}/etc/glm-image-serve/stage-ca{{- end }}
{{- define "glm-image-serve.httpKeyDir" -}}/etc/glm-image-serve/http-api-key{{- end }}

{{/* Does this stage (the gateway) serve the OpenAI-compatible HTTP API, and with an API key? */}}
{{- define "glm-image-serve.http" -}}
{{- if eq .component "gateway" }}{{ if .root.Values.gateway.http.enabled }}true{{ end }}{{ end }}
{{- end }}
{{- define "glm-image-serve.httpKey" -}}
{{- if include "glm-image-serve.http" . }}{{ if .root.Values.gateway.http.apiKeySecret.name }}true{{ end }}{{ end }}
{{- end }}

{{/* Does this stage load the model? */}}
{{- define "glm-image-serve.usesModel" -}}
{{- if ne .component "gateway" }}true{{ end }}
{{- end }}

{{/* Is TLS on between the gateway and the two stages? Fails when only one stage has it. */}}
{{- define "glm-image-serve.stageTLS" -}}
{{- $values := .Values }}
{{- if ne (toString $values.planner.tls.enabled) (toString $values.decoder.tls.enabled) }}
{{- fail "planner.tls.enabled and decoder.tls.enabled must be equal: the gateway verifies both stages with one CA (--stage-tls-ca-file)" }}
{{- end }}
{{- if $values.planner.tls.enabled }}true{{ end }}
{{- end }}

{{/* DNS name a client verifies this stage's certificate against. */}}
{{- define "glm-image-serve.tlsServerName" -}}
{{- if eq .component "gateway" }}
{{- printf "%s.%s.svc.%s" (include "glm-image-serve.componentName" .) .root.Release.Namespace .root.Values.clusterDomain }}
{{- else }}
{{- include "glm-image-serve.headlessFQDN" . }}
{{- end }}
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
{{- if $stage.tls.enabled }}
- --tls-cert-file={{ include "glm-image-serve.tlsDir" . }}/tls.crt
- --tls-key-file={{ include "glm-image-serve.tlsDir" . }}/tls.key
{{- end }}
{{- if eq .component "planner" }}
- --engine={{ $stage.engine }}
{{- else if eq .component "decoder" }}
- --device={{ $stage.device }}
{{- else if eq .component "gateway" }}
{{- $planner := dict "root" $root "component" "planner" }}
{{- $decoder := dict "root" $root "component" "decoder" }}
{{- $plannerTargets := $stage.plannerTargets | default (list (printf "dns:///%s:%v" (include "glm-image-serve.headlessFQDN" $planner) $root.Values.planner.port)) }}
{{- $decoderTargets := $stage.decoderTargets | default (list (printf "dns:///%s:%v" (include "glm-image-serve.headlessFQDN" $decoder) $root.Values.decoder.port)) }}
- --planner={{ join "," $plannerTargets }}
- --decoder={{ join "," $decoderTargets }}
{{- if include "glm-image-serve.stageTLS" $root }}
- --stage-tls-ca-file={{ include "glm-image-serve.stageCADir" . }}/ca.crt
{{- end }}
{{- if include "glm-image-serve.http" . }}
- --http-port={{ $stage.http.port }}
- --served-model-name={{ $stage.http.servedModelName }}
{{- end }}
{{- if include "glm-image-serve.httpKey" . }}
- --http-api-key-file={{ include "glm-image-serve.httpKeyDir" . }}/api-key
{{- end }}
{{- end }}
{{- range $stage.extraArgs }}
- {{ toString . | quote }}
{{- end }}
{{- end }}

{{/*
One probe: dict "ctx" (root+component) "probe" (its values) "kind" (startup|readiness|liveness).
Native gRPC probes (grpc.health.v1) in plaintext. The kubelet's gRPC probe cannot speak TLS, so a
stage serving TLS is probed by the image's own health client over loopback instead.
*/}}
{{- define "glm-image-serve.probe" -}}
{{- $ctx := .ctx }}
{{- $stage := index $ctx.root.Values $ctx.component }}
{{- $probe := .probe }}
{{- if $stage.tls.enabled }}
exec:
  command:
    - python
    - -m
    - servekit.healthcheck
    - --address=127.0.0.1:{{ $stage.port }}
    - --service={{ $probe.service }}
    - --tls-ca-file={{ include "glm-image-serve.tlsDir" $ctx }}/ca.crt
    - --tls-server-name={{ include "glm-image-serve.tlsServerName" $ctx }}
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
{{- if and $stage.tls.enabled (not $stage.tls.secretName) }}
{{- fail (printf "%s.tls.secretName is required when %s.tls.enabled" $component $component) }}
{{- end }}
{{- $stageTLS := and (eq $component "gateway") (include "glm-image-serve.stageTLS" $root) }}
{{- $caSecret := "" }}
{{- if $stageTLS }}
{{- $caSecret = default $root.Values.planner.tls.secretName $stage.stageTLS.caSecretName }}
{{- if not $caSecret }}
{{- fail "gateway.stageTLS.caSecretName (or planner.tls.secretName) is required when planner and decoder serve TLS" }}
{{- end }}
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
            {{- if $stage.tls.enabled }}
            - name: tls
              mountPath: {{ include "glm-image-serve.tlsDir" $ctx }}
              readOnly: true
            {{- end }}
            {{- if $stageTLS }}
            - name: stage-ca
              mountPath: {{ include "glm-image-serve.stageCADir" $ctx }}
              readOnly: true
            {{- end }}
            {{- if include "glm-image-serve.httpKey" $ctx }}
            - name: http-api-key
              mountPath: {{ include "glm-image-serve.httpKeyDir" $ctx }}
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
        {{- if $stage.tls.enabled }}
        - name: tls
          secret:
            secretName: {{ $stage.tls.secretName }}
            defaultMode: 0440
        {{- end }}
        {{- if $stageTLS }}
        - name: stage-ca
          secret:
            secretName: {{ $caSecret }}
            defaultMode: 0440
            items:
              - key: {{ $stage.stageTLS.caKey }}
                path: ca.crt
        {{- end }}
        {{- if include "glm-image-serve.httpKey" $ctx }}
        - name: http-api-key
          secret:
            secretName: {{ $stage.http.apiKeySecret.name }}
            defaultMode: 0440
            items:
              - key: {{ $stage.http.apiKeySecret.key }}
                path: api-key
        {{- end }}
        {{- with $stage.extraVolumes }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
{{- end }}
