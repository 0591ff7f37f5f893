{{- define "strata.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- define "strata.labels" -}}
app.kubernetes.io/part-of: strata
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}
{{- define "strata.socketDir" -}}
{{ .Values.kubeletDir }}/plugins/{{ .Values.csiDriver.name }}
{{- end -}}
