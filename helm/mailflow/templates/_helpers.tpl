{{/* Names, labels and the values that several templates share. */}}

{{- define "mailflow.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-<chart>, or the release name alone when it already contains the chart name. */}}
{{- define "mailflow.fullname" -}}
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

{{/* Room is left for the suffixes (-operator, -relay-headless) and the pod ordinal. */}}
{{- define "mailflow.operator.fullname" -}}
{{- printf "%s-operator" (include "mailflow.fullname" . | trunc 45 | trimSuffix "-") }}
{{- end }}
{{- define "mailflow.relay.fullname" -}}
{{- printf "%s-relay" (include "mailflow.fullname" . | trunc 45 | trimSuffix "-") }}
{{- end }}
{{- define "mailflow.relay.headless" -}}
{{- printf "%s-headless" (include "mailflow.relay.fullname" .) }}
{{- end }}

{{- define "mailflow.routingSecret" -}}
{{- default (printf "%s-routing" (include "mailflow.fullname" .)) .Values.routing.secretName }}
{{- end }}

{{- define "mailflow.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "mailflow.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mailflow
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: operator, relay or helm-test. */}}
{{- define "mailflow.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mailflow.name" .context }}
app.kubernetes.io/instance: {{ .context.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "mailflow.relay.selector" -}}
{{- printf "app.kubernetes.io/name=%s,app.kubernetes.io/instance=%s,app.kubernetes.io/component=relay" (include "mailflow.name" .) .Release.Name }}
{{- end }}

{{- define "mailflow.image" -}}
{{- $tag := default .context.Chart.AppVersion .image.tag }}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{- define "mailflow.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "mailflow.operator.fullname" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "mailflow.relay.serviceAccountName" -}}
{{- if .Values.relay.serviceAccount.create }}
{{- default (include "mailflow.relay.fullname" .) .Values.relay.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.relay.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Namespaces the operator reconciles: the configured ones, or the release namespace. */}}
{{- define "mailflow.operator.namespaces" -}}
{{- $namespaces := .Values.operator.watchNamespaces | default (list .Release.Namespace) }}
{{- toJson (uniq $namespaces) }}
{{- end }}

{{/*
The most relay pods there can be: the HPA's maximum, or the fixed replica count. The relay's
Role lists their names (a StatefulSet's pods are <name>-0 .. <name>-N-1) as resourceNames.
*/}}
{{- define "mailflow.relay.maxPods" -}}
{{- if .Values.relay.autoscaling.enabled }}
{{- max .Values.relay.autoscaling.maxReplicas .Values.relay.replicas }}
{{- else }}
{{- .Values.relay.replicas }}
{{- end }}
{{- end }}
