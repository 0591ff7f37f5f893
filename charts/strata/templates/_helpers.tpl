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
{{/* The operator's settings file (ConfigMap strata-operator; its sha256 is the controller
pod template's checksum/config annotation, so `helm upgrade` of operator.settings restarts
the operator). */}}
{{- define "strata.operatorSettings" -}}
image: {{ include "strata.image" . }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
{{- if .Values.priorityClasses.create }}
memberPriorityClass: {{ .Values.priorityClasses.node }}
{{- end }}
csiDriver: {{ .Values.csiDriver.name }}
{{- with .Values.operator.settings }}
{{ toYaml . }}
{{- end }}
{{- end -}}
{{/* The CSI driver name as the kubernetes-csi sidecars sanitize it for their leader-election
Lease names (csi-lib-utils leaderelection: every character outside [a-zA-Z0-9-] becomes '-',
an 'X' is appended to a trailing '-'). */}}
{{- define "strata.sanitizedDriver" -}}
{{- $n := regexReplaceAll "[^a-zA-Z0-9-]" .Values.csiDriver.name "-" -}}
{{- if hasSuffix "-" $n }}{{ $n = printf "%sX" $n }}{{ end -}}
{{ $n }}
{{- end -}}
{{/* Leader-election Leases of the release: csi-provisioner's (the sanitized driver name),
csi-resizer's ("external-resizer-" + it) and the operator's. */}}
{{- define "strata.leaseNames" -}}
{{- $d := include "strata.sanitizedDriver" . -}}
{{ $d }},external-resizer-{{ $d }}{{ if .Values.operator.enabled }},strata-operator-leader{{ end }}
{{- end -}}
{{/* hostPaths: volumes (type DirectoryOrCreate) named host-path-N (empty: nothing). */}}
{{- define "strata.hostPathVolumes" -}}
{{- $out := list -}}
{{- range $i, $p := .Values.hostPaths -}}
{{- $out = append $out (dict "name" (printf "host-path-%d" $i) "hostPath" (dict "path" $p "type" "DirectoryOrCreate")) -}}
{{- end -}}
{{- if $out }}{{ toYaml $out }}{{ end -}}
{{- end -}}
{{/* hostPaths: mounts at the same path as on the host (empty: nothing). */}}
{{- define "strata.hostPathMounts" -}}
{{- $out := list -}}
{{- range $i, $p := .Values.hostPaths -}}
{{- $out = append $out (dict "name" (printf "host-path-%d" $i) "mountPath" $p) -}}
{{- end -}}
{{- if $out }}{{ toYaml $out }}{{ end -}}
{{- end -}}
{{/* hostPaths: an init container giving each directory to uid/gid 65532, the one owner of a
volume's local files (the operator formats as 65532, mount Pods run as 65532). Root, with
CAP_CHOWN only; not recursive. */}}
{{- define "strata.hostPathChown" -}}
{{- if .Values.hostPaths -}}
- name: host-path-owner
  image: {{ include "strata.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["chown", "65532:65532"{{ range .Values.hostPaths }}, {{ . | quote }}{{ end }}]
  securityContext:
    runAsUser: 0
    runAsGroup: 0
    runAsNonRoot: false
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    capabilities: {drop: ["ALL"], add: ["CHOWN"]}
  resources:
    requests: {cpu: 10m, memory: 16Mi}
    limits: {memory: 64Mi}
  volumeMounts:
    {{- include "strata.hostPathMounts" . | nindent 4 }}
{{- end }}
{{- end -}}
