{{/*
Names and labels shared by every template.
*/}}

{{- define "gateway-extproc.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Resource names are DNS labels (63 characters); a release called like the chart does not
repeat it.
*/}}
{{- define "gateway-extproc.fullname" -}}
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

{{- define "gateway-extproc.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that never change for a release: the Deployment's selector. */}}
{{- define "gateway-extproc.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gateway-extproc.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "gateway-extproc.labels" -}}
helm.sh/chart: {{ include "gateway-extproc.chart" . }}
{{ include "gateway-extproc.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: gateway-extproc
{{- end }}

{{- define "gateway-extproc.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "gateway-extproc.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Namespaces the informer watches, as a list. With namespaced RBAC and none given, only
the release namespace: a Role cannot grant more. With cluster RBAC and none given, the
empty list, which the processor reads as "every namespace".
*/}}
{{- define "gateway-extproc.watchNamespaces" -}}
{{- $namespaces := .Values.kubernetes.watchNamespaces | default list }}
{{- if and (not $namespaces) (eq .Values.rbac.scope "namespace") }}
{{- $namespaces = list .Release.Namespace }}
{{- end }}
{{- toJson $namespaces }}
{{- end }}

{{- define "gateway-extproc.gatewayNamespace" -}}
{{- .Values.envoyGateway.gateway.namespace | default .Release.Namespace }}
{{- end }}

{{- define "gateway-extproc.httpRouteName" -}}
{{- .Values.envoyGateway.httpRoute.name | default (include "gateway-extproc.fullname" .) }}
{{- end }}

{{- define "gateway-extproc.extensionPolicyName" -}}
{{- include "gateway-extproc.fullname" . }}
{{- end }}

{{/*
Where the EnvoyExtensionPolicy lives: policies must sit in their target's namespace, so
beside the Gateway when attached to it, beside the HTTPRoute (release namespace)
otherwise.
*/}}
{{- define "gateway-extproc.extensionPolicyNamespace" -}}
{{- if eq .Values.envoyGateway.attachTo "Gateway" }}
{{- include "gateway-extproc.gatewayNamespace" . }}
{{- else }}
{{- .Release.Namespace }}
{{- end }}
{{- end }}

{{/* The ORIGINAL_DST cluster the patch adds; namespaced so two releases cannot collide. */}}
{{- define "gateway-extproc.originalDstCluster" -}}
{{- printf "gateway-extproc/%s/%s/model-pods" .Release.Namespace (include "gateway-extproc.fullname" .) }}
{{- end }}

{{/*
A Kubernetes name made safe for an RFC 9535 match() regular expression inside a JSONPath
string: dots are the only regex metacharacter a DNS name can hold, and a bracket class
avoids backslash escapes, which JSONPath string literals would reject.
*/}}
{{- define "gateway-extproc.regexName" -}}
{{- . | replace "." "[.]" }}
{{- end }}

{{- define "gateway-extproc.terminationGracePeriodSeconds" -}}
{{- $floor := add (int (ceil .Values.config.gracePeriod)) (int (ceil .Values.config.drainDelay)) (int .Values.preStopSleepSeconds) }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $floor 10 }}
{{- else if le (int .Values.terminationGracePeriodSeconds) $floor }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed preStopSleepSeconds + config.drainDelay + config.gracePeriod (%v), or Kubernetes kills in-flight streams before their grace period ends" .Values.terminationGracePeriodSeconds $floor) }}
{{- else }}
{{- int .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* The InferencePool the processor serves (config.discovery: inferencepool). */}}
{{- define "gateway-extproc.poolName" -}}
{{- .Values.inferencePool.name | default (include "gateway-extproc.fullname" .) }}
{{- end }}

{{/* Does the processor read the cluster (pods, or an InferencePool and its pods)? */}}
{{- define "gateway-extproc.watchesCluster" -}}
{{- if has .Values.config.discovery (list "kubernetes" "inferencepool") }}true{{ end }}
{{- end }}
