{{/* Chart name, overridable. */}}
{{- define "workout-api.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name. A release called like the chart ("workout-api") yields just "workout-api",
the Deployment name the pipeline and the Argo CD Application expect.
*/}}
{{- define "workout-api.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "workout-api.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "workout-api.labels" -}}
helm.sh/chart: {{ include "workout-api.chart" . }}
{{ include "workout-api.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels must never change for a release: they are immutable on a Deployment. */}}
{{- define "workout-api.selectorLabels" -}}
app.kubernetes.io/name: {{ include "workout-api.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "workout-api.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "workout-api.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret the pods read: created out of band by default, or by this chart when secrets.create. */}}
{{- define "workout-api.secretName" -}}
{{- default (printf "%s-secrets" (include "workout-api.fullname" .)) .Values.secrets.existingSecret }}
{{- end }}

{{- define "workout-api.configMapName" -}}
{{- printf "%s-config" (include "workout-api.fullname" .) }}
{{- end }}
