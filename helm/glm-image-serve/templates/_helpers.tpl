{{/*
Names, labels and images. Every per-stage helper takes a dict with "root" (the chart context) and
"component" (planner, decoder or gateway); `glm-image-serve.stage` returns that stage's values.
Nothing here mixes one stage's values into another stage's pods: a stage's pod template depends
only on its own block and on values the stages really share (model storage, service account).
*/}}

{{- define "glm-image-serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name prefix; 40 characters leave room for "-planner-headless" within 63. */}}
{{- define "glm-image-serve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "glm-image-serve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The values block of one stage. */}}
{{- define "glm-image-serve.stage" -}}
{{- toYaml (index .root.Values .component) }}
{{- end }}

{{/* Name of a stage's Deployment (and of its other objects): <fullname>-<component>. */}}
{{- define "glm-image-serve.componentName" -}}
{{- printf "%s-%s" (include "glm-image-serve.fullname" .root) .component }}
{{- end }}

{{/* Headless Service of a stage: the gateway resolves it to the ready pods' addresses. */}}
{{- define "glm-image-serve.headlessName" -}}
{{- printf "%s-%s-headless" (include "glm-image-serve.fullname" .root) .component }}
{{- end }}

{{/* Fully qualified DNS name of a stage's headless Service. */}}
{{- define "glm-image-serve.headlessFQDN" -}}
{{- printf "%s.%s.svc.%s" (include "glm-image-serve.headlessName" .) .root.Release.Namespace .root.Values.clusterDomain }}
{{- end }}

{{/* Image tag of a stage: its own tag, else the chart's appVersion. */}}
{{- define "glm-image-serve.imageTag" -}}
{{- $stage := index .root.Values .component }}
{{- default .root.Chart.AppVersion $stage.image.tag | toString }}
{{- end }}

{{/* Full image reference of a stage: [registry/]repository:tag[@digest]. */}}
{{- define "glm-image-serve.image" -}}
{{- $stage := index .root.Values .component }}
{{- $image := $stage.image }}
{{- $tag := include "glm-image-serve.imageTag" . }}
{{- if eq $tag "latest" }}
{{- fail (printf "%s.image.tag: 'latest' is not allowed; pin a version (and optionally a digest)" .component) }}
{{- end }}
{{- $registry := default .root.Values.imageRegistry $image.registry }}
{{- $repository := $image.repository }}
{{- if $registry }}
{{- $repository = printf "%s/%s" (trimSuffix "/" $registry) $image.repository }}
{{- end }}
{{- if $image.digest }}
{{- printf "%s:%s@%s" $repository $tag $image.digest }}
{{- else }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}
{{- end }}

{{/*
Selector labels: name, instance and component only. They never change over a release's life, so
Deployments, Services, PDBs and monitors keep matching the same pods across upgrades.
*/}}
{{- define "glm-image-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "glm-image-serve.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* A label value made from an image tag (labels allow [A-Za-z0-9._-], 63 characters). */}}
{{- define "glm-image-serve.versionLabel" -}}
{{- regexReplaceAll "[^A-Za-z0-9._-]" (include "glm-image-serve.imageTag" .) "_" | trunc 63 | trimSuffix "-" | trimSuffix "_" | trimSuffix "." }}
{{- end }}

{{/*
Labels of a stage's objects. app.kubernetes.io/version is the stage's own image tag, so that
upgrading one stage relabels that stage's objects only.
*/}}
{{- define "glm-image-serve.labels" -}}
helm.sh/chart: {{ include "glm-image-serve.chart" .root }}
{{ include "glm-image-serve.selectorLabels" . }}
app.kubernetes.io/version: {{ include "glm-image-serve.versionLabel" . | quote }}
app.kubernetes.io/part-of: glm-image-serve
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end }}

{{/*
Labels of a stage's pod template: no chart version (a chart release that changes nothing in a
stage must not restart it), only the selector, the stage's version and its podLabels.
*/}}
{{- define "glm-image-serve.podLabels" -}}
{{ include "glm-image-serve.selectorLabels" . }}
app.kubernetes.io/version: {{ include "glm-image-serve.versionLabel" . | quote }}
app.kubernetes.io/part-of: glm-image-serve
{{- with (index .root.Values .component).podLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels of objects shared by the stages (the ServiceAccount). */}}
{{- define "glm-image-serve.sharedLabels" -}}
helm.sh/chart: {{ include "glm-image-serve.chart" . }}
app.kubernetes.io/name: {{ include "glm-image-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: glm-image-serve
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "glm-image-serve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "glm-image-serve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
GPUs the planner's vLLM engine will use: tensor x pipeline x data parallel size, read from
planner.extraArgs ("--flag N" or "--flag=N").
*/}}
{{- define "glm-image-serve.plannerEngineGPUs" -}}
{{- $args := .Values.planner.extraArgs | default list }}
{{- $sizes := dict "tensor" 1 "pipeline" 1 "data" 1 }}
{{- range $i, $arg := $args }}
{{- $arg = toString $arg }}
{{- range $kind := list "tensor" "pipeline" "data" }}
{{- $flag := printf "--%s-parallel-size" $kind }}
{{- if hasPrefix (printf "%s=" $flag) $arg }}
{{- $_ := set $sizes $kind (trimPrefix (printf "%s=" $flag) $arg | int) }}
{{- else if and (eq $arg $flag) (lt (add1 $i) (len $args)) }}
{{- $_ := set $sizes $kind (index $args (add1 $i) | toString | int) }}
{{- end }}
{{- end }}
{{- end }}
{{- mul $sizes.tensor $sizes.pipeline $sizes.data }}
{{- end }}

{{/* nvidia.com/gpu of a stage (limits, else requests), or 0. */}}
{{- define "glm-image-serve.gpuCount" -}}
{{- $resources := (index .root.Values .component).resources | default dict }}
{{- $limits := $resources.limits | default dict }}
{{- $requests := $resources.requests | default dict }}
{{- index $limits "nvidia.com/gpu" | default (index $requests "nvidia.com/gpu") | default 0 | toString | int }}
{{- end }}
