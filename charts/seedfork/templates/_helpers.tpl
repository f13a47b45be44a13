{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "seedfork.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "seedfork.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "seedfork.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "seedfork.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "seedfork.labels" -}}
{{ include "seedfork.commonLabels" . }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "seedfork.agentLabels" -}}
{{ include "seedfork.commonLabels" . }}
app.kubernetes.io/component: agent
{{- end -}}

{{- define "seedfork.selectorLabels" -}}
app.kubernetes.io/name: {{ include "seedfork.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "seedfork.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "seedfork.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* True (non-empty) when the operator serves every namespace. */}}
{{- define "seedfork.allNamespaces" -}}
{{- if and .Values.rbac.clusterWide (empty .Values.watchNamespaces) -}}true{{- end -}}
{{- end -}}

{{/* The namespaces the operator serves, as a JSON list (empty when it serves all). */}}
{{- define "seedfork.watchNamespaces" -}}
{{- if include "seedfork.allNamespaces" . -}}
{{- list | toJson -}}
{{- else if .Values.watchNamespaces -}}
{{- .Values.watchNamespaces | uniq | toJson -}}
{{- else -}}
{{- list .Release.Namespace | toJson -}}
{{- end -}}
{{- end -}}

{{/* Namespaces that get the agent ServiceAccount and Role, as a JSON list. */}}
{{- define "seedfork.agentNamespaces" -}}
{{- if .Values.agent.namespaces -}}
{{- .Values.agent.namespaces | uniq | toJson -}}
{{- else if include "seedfork.allNamespaces" . -}}
{{- list .Release.Namespace | toJson -}}
{{- else -}}
{{- include "seedfork.watchNamespaces" . -}}
{{- end -}}
{{- end -}}

{{- define "seedfork.image" -}}
{{- $tag := default .root.Chart.AppVersion .image.tag -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end -}}
