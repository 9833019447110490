{{/* Names and labels shared by every template. */}}

{{- define "podshaper.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped name: cluster-scoped objects (ClusterRole, policy) must not clash between releases. */}}
{{- define "podshaper.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "podshaper.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "podshaper.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "podshaper.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The agent pods' selector. The uninstall hook finds the agents with exactly these two labels, so
no other pod of the release may carry both.
*/}}
{{- define "podshaper.selectorLabels" -}}
app.kubernetes.io/name: {{ include "podshaper.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "podshaper.selector" -}}
{{- printf "app.kubernetes.io/name=%s,app.kubernetes.io/instance=%s" (include "podshaper.name" .) .Release.Name }}
{{- end }}

{{- define "podshaper.labels" -}}
helm.sh/chart: {{ include "podshaper.chart" . }}
{{ include "podshaper.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "podshaper.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* The controller's pods: a name label of their own, so the agents' selector never picks them. */}}
{{- define "podshaper.controllerSelectorLabels" -}}
app.kubernetes.io/name: {{ include "podshaper.name" . }}-controller
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "podshaper.controllerLabels" -}}
helm.sh/chart: {{ include "podshaper.chart" . }}
{{ include "podshaper.controllerSelectorLabels" . }}
app.kubernetes.io/component: controller
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}
