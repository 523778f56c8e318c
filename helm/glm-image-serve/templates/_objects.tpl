{{/*
Per-stage objects other than the Deployment; each takes dict "root" and "component" and is called
from a <kind>-<component>.yaml file.
*/}}

{{/* Headless Service of planner or decoder: DNS returns the ready pods, the gateway balances. */}}
{{- define "glm-image-serve.headlessService" -}}
{{- $root := .root }}
{{- $stage := index $root.Values .component }}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "glm-image-serve.headlessName" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "glm-image-serve.labels" . | nindent 4 }}
  {{- with $stage.service.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  clusterIP: None
  # Only pods whose readiness (grpc.health.v1 SERVING) passes are published.
  publishNotReadyAddresses: false
  selector:
    {{- include "glm-image-serve.selectorLabels" . | nindent 4 }}
  ports:
    - name: grpc
      port: {{ $stage.port }}
      targetPort: grpc
      protocol: TCP
      appProtocol: {{ ternary "grpc" "kubernetes.io/h2c" (eq (include "glm-image-serve.servesTLS" .) "true") }}
    - name: metrics
      port: {{ $stage.metrics.port }}
      targetPort: metrics
      protocol: TCP
{{- end }}

{{- define "glm-image-serve.pdb" -}}
{{- $root := .root }}
{{- $stage := index $root.Values .component }}
{{- if $stage.pdb.enabled }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "glm-image-serve.componentName" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "glm-image-serve.labels" . | nindent 4 }}
spec:
  {{- if not (kindIs "invalid" $stage.pdb.minAvailable) }}
  {{- if ne (toString $stage.pdb.minAvailable) "" }}
  minAvailable: {{ $stage.pdb.minAvailable }}
  {{- else }}
  maxUnavailable: {{ $stage.pdb.maxUnavailable }}
  {{- end }}
  {{- else }}
  maxUnavailable: {{ $stage.pdb.maxUnavailable }}
  {{- end }}
  {{- with $stage.pdb.unhealthyPodEvictionPolicy }}
  unhealthyPodEvictionPolicy: {{ . }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "glm-image-serve.selectorLabels" . | nindent 6 }}
{{- end }}
{{- end }}

{{/* KEDA ScaledObject of planner or decoder on the stage's demand: its pods' queued + in-flight
requests, plus the requests waiting for the stage at the gateways (which the pods cannot see). */}}
{{- define "glm-image-serve.scaledObject" -}}
{{- $root := .root }}
{{- $component := .component }}
{{- $stage := index $root.Values $component }}
{{- $autoscaling := $stage.autoscaling }}
{{- if $autoscaling.enabled }}
{{- $pods := printf "%s-.+" (include "glm-image-serve.componentName" .) }}
{{- $selector := printf "stage=%q,namespace=%q,pod=~%q" $component $root.Release.Namespace $pods }}
{{- $gatewayPods := printf "%s-.+" (include "glm-image-serve.componentName" (dict "root" $root "component" "gateway")) }}
{{- $waiting := printf "sum(glmimage_gateway_stage_waiting{stage=%q,namespace=%q,pod=~%q})" $component $root.Release.Namespace $gatewayPods }}
{{- $served := printf "sum({__name__=~\"glmimage_requests_(queued|in_flight)\",%s})" $selector }}
{{- $query := $autoscaling.query | default (printf "(%s or vector(0)) + (%s or vector(0))" $served $waiting) }}
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata:
  name: {{ include "glm-image-serve.componentName" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "glm-image-serve.labels" . | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "glm-image-serve.componentName" . }}
  minReplicaCount: {{ $autoscaling.minReplicas }}
  maxReplicaCount: {{ $autoscaling.maxReplicas }}
  pollingInterval: {{ $autoscaling.pollingInterval }}
  cooldownPeriod: {{ $autoscaling.cooldownPeriod }}
  {{- with $autoscaling.behavior }}
  advanced:
    horizontalPodAutoscalerConfig:
      behavior:
        {{- toYaml . | nindent 8 }}
  {{- end }}
  triggers:
    - type: prometheus
      metricType: AverageValue
      metadata:
        serverAddress: {{ required "monitoring.prometheusAddress is required for autoscaling" $root.Values.monitoring.prometheusAddress | quote }}
        query: {{ $query | quote }}
        threshold: {{ $autoscaling.threshold | toString | quote }}
        # no samples (e.g. every pod still loading) counts as zero load
        ignoreNullValues: "true"
{{- end }}
{{- end }}

{{- define "glm-image-serve.podMonitor" -}}
{{- $root := .root }}
{{- $stage := index $root.Values .component }}
{{- $monitor := $stage.metrics.podMonitor }}
{{- if $monitor.enabled }}
apiVersion: monitoring.coreos.com/v1
kind: PodMonitor
metadata:
  name: {{ include "glm-image-serve.componentName" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "glm-image-serve.labels" . | nindent 4 }}
    {{- with $monitor.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  selector:
    matchLabels:
      {{- include "glm-image-serve.selectorLabels" . | nindent 6 }}
  podMetricsEndpoints:
    - port: metrics
      path: /metrics
      interval: {{ $monitor.interval }}
      scrapeTimeout: {{ $monitor.scrapeTimeout }}
{{- end }}
{{- end }}

{{- define "glm-image-serve.serviceMonitor" -}}
{{- $root := .root }}
{{- $stage := index $root.Values .component }}
{{- $monitor := $stage.metrics.serviceMonitor }}
{{- if $monitor.enabled }}
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata:
  name: {{ include "glm-image-serve.componentName" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "glm-image-serve.labels" . | nindent 4 }}
    {{- with $monitor.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  selector:
    matchLabels:
      {{- include "glm-image-serve.selectorLabels" . | nindent 6 }}
  endpoints:
    - port: metrics
      path: /metrics
      interval: {{ $monitor.interval }}
      scrapeTimeout: {{ $monitor.scrapeTimeout }}
{{- end }}
{{- end }}

{{/*
cert-manager Certificate: dict "ctx" (root+component), "name" (of the Certificate and its Secret),
"usages", "dnsNames" (list) and optionally "commonName".
*/}}
{{- define "glm-image-serve.certificate" -}}
{{- $root := .ctx.root }}
{{- $certManager := $root.Values.tls.certManager }}
apiVersion: cert-manager.io/v1
kind: Certificate
metadata:
  name: {{ .name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "glm-image-serve.labels" .ctx | nindent 4 }}
spec:
  secretName: {{ .name }}
  secretTemplate:
    labels:
      {{- include "glm-image-serve.selectorLabels" .ctx | nindent 6 }}
  {{- with .commonName }}
  commonName: {{ . }}
  {{- end }}
  {{- with .dnsNames }}
  dnsNames:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  usages:
    {{- toYaml .usages | nindent 4 }}
  duration: {{ $certManager.duration }}
  renewBefore: {{ $certManager.renewBefore }}
  privateKey:
    algorithm: {{ $certManager.privateKey.algorithm }}
    {{- if ne $certManager.privateKey.algorithm "Ed25519" }}
    size: {{ $certManager.privateKey.size }}
    {{- end }}
    # a new key on every renewal
    rotationPolicy: Always
  issuerRef:
    name: {{ required "tls.certManager.issuerRef.name is required with tls.certManager.enabled" $certManager.issuerRef.name }}
    kind: {{ $certManager.issuerRef.kind }}
    group: {{ $certManager.issuerRef.group }}
{{- end }}

{{/*
The certificates cert-manager issues for one stage (tls.certManager.enabled, no existing Secret
named): planner and decoder a serving certificate for their headless Service (also for client auth
with mutual TLS: their probes present it); the gateway a serving certificate for its Service when
gateway.tls is on, and its client certificate for the stages with mutual TLS.
*/}}
{{- define "glm-image-serve.certificates" -}}
{{- $root := .root }}
{{- $mutual := include "glm-image-serve.mutualTLS" $root }}
{{- $base := list "digital signature" "key encipherment" }}
{{- $documents := list }}
{{- if include "glm-image-serve.issuesServingCert" . }}
{{- $dnsNames := include "glm-image-serve.serviceDNSNames" . | fromYamlArray }}
{{- $usages := append $base "server auth" }}
{{- if eq .component "gateway" }}
{{- $dnsNames = concat $dnsNames $root.Values.tls.certManager.gatewayDNSNames }}
{{- else if $mutual }}
{{- $usages = append $usages "client auth" }}
{{- end }}
{{- $documents = append $documents (include "glm-image-serve.certificate" (dict "ctx" . "name" (include "glm-image-serve.tlsSecretName" .) "usages" $usages "dnsNames" $dnsNames)) }}
{{- end }}
{{- if and (eq .component "gateway") (include "glm-image-serve.issuesClientCert" $root) }}
{{- $documents = append $documents (include "glm-image-serve.certificate" (dict "ctx" . "name" (include "glm-image-serve.clientSecretName" $root) "usages" (append $base "client auth") "commonName" (include "glm-image-serve.componentName" .))) }}
{{- end }}
{{- join "\n---\n" $documents }}
{{- end }}

{{/*
NetworkPolicy of a stage (ingress only; egress stays open for DNS, the stages and model downloads).
planner and decoder: gRPC from this release's gateway pods (and networkPolicy.stageFrom) only.
gateway: gRPC and HTTP from networkPolicy.gatewayFrom (empty: from anywhere). Every stage: metrics
from networkPolicy.metricsFrom (the Prometheus that scrapes them; empty: from anywhere).
*/}}
{{- define "glm-image-serve.networkPolicy" -}}
{{- $root := .root }}
{{- $policy := $root.Values.networkPolicy }}
{{- $stage := index $root.Values .component }}
{{- if $policy.enabled }}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ include "glm-image-serve.componentName" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "glm-image-serve.labels" . | nindent 4 }}
spec:
  podSelector:
    matchLabels:
      {{- include "glm-image-serve.selectorLabels" . | nindent 6 }}
  policyTypes:
    - Ingress
  ingress:
    {{- if eq .component "gateway" }}
    - ports:
        - port: {{ $stage.port }}
          protocol: TCP
        {{- if include "glm-image-serve.http" . }}
        - port: {{ $stage.http.port }}
          protocol: TCP
        {{- end }}
      {{- with $policy.gatewayFrom }}
      from:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    {{- else }}
    - ports:
        - port: {{ $stage.port }}
          protocol: TCP
      from:
        - podSelector:
            matchLabels:
              {{- include "glm-image-serve.selectorLabels" (dict "root" $root "component" "gateway") | nindent 14 }}
        {{- with $policy.stageFrom }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    {{- end }}
    - ports:
        - port: {{ $stage.metrics.port }}
          protocol: TCP
      {{- with $policy.metricsFrom }}
      from:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}
{{- end }}

{{/*
The gateway's API keys as the chart's own Secret (gateway.apiKeys.entries): sha256 digests and
names only, never a key. Not rendered with gateway.apiKeys.existingSecret.
*/}}
{{- define "glm-image-serve.apiKeysSecret" -}}
{{- $root := .root }}
{{- $keys := $root.Values.gateway.apiKeys }}
{{- $name := include "glm-image-serve.apiKeysSecretName" $root }}
{{- if and $name (not $keys.existingSecret) }}
{{- $seen := dict }}
{{- range $keys.entries }}
{{- $digest := toString .sha256 }}
{{- if not (regexMatch "^[0-9a-f]{64}$" $digest) }}
{{- fail (printf "gateway.apiKeys.entries: sha256 must be the 64 lowercase hex digits of a key's SHA-256 (printf %%s KEY | sha256sum), never the key itself: %q" $digest) }}
{{- end }}
{{- if hasKey $seen $digest }}
{{- fail (printf "gateway.apiKeys.entries: the digest %s is listed twice" $digest) }}
{{- end }}
{{- $_ := set $seen $digest true }}
{{- end }}
apiVersion: v1
kind: Secret
metadata:
  name: {{ $name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "glm-image-serve.labels" . | nindent 4 }}
type: Opaque
stringData:
  {{ $keys.secretKey }}: |
    # sha256:<hex digest of a key> [name]; the keys themselves are never stored
    {{- range $keys.entries }}
    sha256:{{ .sha256 }}{{ with .name }} {{ . }}{{ end }}
    {{- end }}
{{- end }}
{{- end }}
