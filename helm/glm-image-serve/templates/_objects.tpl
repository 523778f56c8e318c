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
      appProtocol: {{ ternary "grpc" "kubernetes.io/h2c" (and $stage.tls.enabled true) }}
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
