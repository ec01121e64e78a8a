{{- define "inferd.labels" -}}
app.kubernetes.io/name: inferd
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
inferd.dev/model: {{ .Values.model }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "inferd.selector" -}}
app.kubernetes.io/name: inferd
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "inferd.meta" -}}
name: {{ .Release.Name }}
namespace: {{ .Release.Namespace }}
labels:
  {{- include "inferd.labels" . | nindent 2 }}
{{- end -}}

{{- define "inferd.scheme" -}}
{{ if .Values.tlsSecret }}HTTPS{{ else }}HTTP{{ end }}
{{- end -}}

{{- /* Policy checks these objects fail on purpose, and why (checkov reads these). */ -}}
{{- define "inferd.waivers" -}}
checkov.io/skip1: CKV_K8S_43=the image is named by tag so `inferd deploy` output stays readable; pin a digest with --image NAME@sha256:... for production
checkov.io/skip2: CKV_K8S_40=the image's own unprivileged user is uid 1000 (it owns the files baked into the image); uid 1000 is not a host user inside the pod's user namespace
{{- end -}}

{{- /* Chart only: objects go in the release's namespace (`helm install -n NS`), but policy
tools render charts into `default`, which CKV_K8S_21 flags. */ -}}
{{- define "inferd.namespaceWaiver" -}}
checkov.io/skip3: CKV_K8S_21=objects go in the release's namespace (helm install -n NS); policy tools render the chart into `default`
{{- end -}}

{{- /* The endpoint picker of the inference gateway (templates/inferencepool.yaml), pinned as
the Gateway API Inference Extension's release v1.5.0 pins it. */ -}}
{{- define "inferd.epp.name" -}}
{{ .Release.Name }}-epp
{{- end -}}

{{- define "inferd.epp.labels" -}}
app.kubernetes.io/name: endpoint-picker
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: v1.5.0
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "inferd.epp.meta" -}}
name: {{ include "inferd.epp.name" . }}
namespace: {{ .Release.Namespace }}
labels:
  {{- include "inferd.epp.labels" . | nindent 2 }}
{{- end -}}
