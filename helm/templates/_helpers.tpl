{{/* Names, labels and the pieces shared by the RayCluster and the RayJob (mirrors rr/deploy/rayjob.py). */}}

{{- define "rr.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "rr.labels" -}}
app.kubernetes.io/name: rr
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "rr.serviceAccountName" -}}
{{- default (include "rr.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "rr.image" -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag -}}
{{- end -}}

{{- define "rr.jobsClaim" -}}
{{- default (printf "%s-jobs" (include "rr.fullname" .)) .Values.storage.jobs.existingClaim -}}
{{- end -}}

{{- define "rr.modelCacheClaim" -}}
{{- default (printf "%s-model-cache" (include "rr.fullname" .)) .Values.storage.modelCache.existingClaim -}}
{{- end -}}

{{- define "rr.mlflowUri" -}}
{{- if .Values.mlflow.enabled -}}
{{- printf "http://%s-mlflow:%v" (include "rr.fullname" .) .Values.mlflow.port -}}
{{- end -}}
{{- end -}}

{{/* The RayJob's name from the job config's name: rr/deploy/rayjob.py kube_name. */}}
{{- define "rr.jobName" -}}
{{- $name := default "rr-job" .Values.job.config.name -}}
{{- regexReplaceAll "[^a-z0-9-]+" (lower $name) "-" | trunc 47 | trimAll "-" -}}
{{- end -}}

{{- define "rr.hfTokenEnv" -}}
{{- $model := default dict .Values.job.config.model -}}
{{- default "HF_TOKEN" $model.hf_token_env -}}
{{- end -}}

{{- define "rr.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
fsGroup: 1000
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "rr.containerSecurityContext" -}}
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
runAsNonRoot: true
{{- end -}}

{{- define "rr.env" -}}
- name: RR_JOBS_DIR
  value: {{ .Values.storage.jobs.mountPath | quote }}
{{- if .Values.storage.modelCache.enabled }}
- name: HF_HOME
  value: {{ .Values.storage.modelCache.mountPath | quote }}
{{- end }}
{{- if .Values.hfToken.existingSecret }}
- name: {{ include "rr.hfTokenEnv" . }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.hfToken.existingSecret }}
      key: {{ .Values.hfToken.key }}
{{- end }}
{{- end -}}

{{/* volumes and volumeMounts of a Ray pod; args: root, configMap ("" for none), shm ("" for none) */}}
{{- define "rr.rayVolumes" -}}
{{- $root := .root -}}
- name: jobs
  persistentVolumeClaim:
    claimName: {{ include "rr.jobsClaim" $root }}
{{- if $root.Values.storage.modelCache.enabled }}
- name: model-cache
  persistentVolumeClaim:
    claimName: {{ include "rr.modelCacheClaim" $root }}
{{- end }}
{{- if .configMap }}
- name: job-config
  configMap:
    name: {{ .configMap }}
{{- end }}
{{- if .shm }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shm }}
{{- end }}
{{- end -}}

{{- define "rr.rayVolumeMounts" -}}
{{- $root := .root -}}
- name: jobs
  mountPath: {{ $root.Values.storage.jobs.mountPath }}
{{- if $root.Values.storage.modelCache.enabled }}
- name: model-cache
  mountPath: {{ $root.Values.storage.modelCache.mountPath }}
{{- end }}
{{- if .configMap }}
- name: job-config
  mountPath: /etc/rr
  readOnly: true
{{- end }}
{{- if .shm }}
- name: dshm
  mountPath: /dev/shm
{{- end }}
{{- end -}}

{{/* A Ray container; args: root, name, cpu, memory, gpus, configMap, shm */}}
{{- define "rr.rayContainer" -}}
name: {{ .name }}
image: {{ include "rr.image" .root }}
imagePullPolicy: {{ .root.Values.image.pullPolicy }}
workingDir: /app
env:
{{- include "rr.env" .root | nindent 2 }}
volumeMounts:
{{- include "rr.rayVolumeMounts" . | nindent 2 }}
resources:
  requests:
    cpu: {{ .cpu | quote }}
    memory: {{ .memory | quote }}
    {{- if .gpus }}
    nvidia.com/gpu: {{ .gpus | quote }}
    {{- end }}
  limits:
    cpu: {{ .cpu | quote }}
    memory: {{ .memory | quote }}
    {{- if .gpus }}
    nvidia.com/gpu: {{ .gpus | quote }}
    {{- end }}
securityContext:
{{- include "rr.containerSecurityContext" .root | nindent 2 }}
{{- end -}}

{{/* One worker group; args: root, name, group (values), maxReplicas, gpus, configMap */}}
{{- define "rr.workerGroup" -}}
{{- $min := min .group.minReplicas .maxReplicas -}}
groupName: {{ .name }}
replicas: {{ $min }}
minReplicas: {{ $min }}
maxReplicas: {{ .maxReplicas }}
rayStartParams: {}
resources:
  rr_{{ .name }}: "1"
template:
  metadata:
    labels:
      app.kubernetes.io/name: rr
      app.kubernetes.io/component: ray-worker-{{ .name }}
  spec:
    serviceAccountName: {{ include "rr.serviceAccountName" .root }}
    automountServiceAccountToken: false
    restartPolicy: Never
    securityContext:
      {{- include "rr.podSecurityContext" .root | nindent 6 }}
    {{- with .root.Values.imagePullSecrets }}
    imagePullSecrets:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with .group.nodeSelector }}
    nodeSelector:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with .group.tolerations }}
    tolerations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    containers:
      - {{- include "rr.rayContainer" (dict "root" .root "name" "ray-worker" "cpu" .group.cpu "memory" .group.memory "gpus" .gpus "configMap" .configMap "shm" .group.sharedMemory) | nindent 8 }}
    volumes:
      {{- include "rr.rayVolumes" (dict "root" .root "configMap" .configMap "shm" .group.sharedMemory) | nindent 6 }}
{{- end -}}

{{/* A RayCluster spec; args: root, configMap, generationMax, trainingMax, gpu (bool) */}}
{{- define "rr.rayClusterSpec" -}}
{{- $root := .root -}}
{{- $ray := $root.Values.ray -}}
rayVersion: {{ $ray.version | quote }}
enableInTreeAutoscaling: true
autoscalerOptions:
  version: v2
  upscalingMode: Default
  idleTimeoutSeconds: {{ $ray.idleTimeoutSeconds }}
  securityContext:
    {{- include "rr.containerSecurityContext" $root | nindent 4 }}
headGroupSpec:
  rayStartParams:
    num-cpus: "0"
    num-gpus: "0"
    dashboard-host: "0.0.0.0"
  template:
    metadata:
      labels:
        app.kubernetes.io/name: rr
        app.kubernetes.io/component: ray-head
    spec:
      securityContext:
        {{- include "rr.podSecurityContext" $root | nindent 8 }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $ray.head.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $ray.head.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - {{- include "rr.rayContainer" (dict "root" $root "name" "ray-head" "cpu" $ray.head.cpu "memory" $ray.head.memory "gpus" 0 "configMap" .configMap "shm" "") | nindent 10 }}
          ports:
            - {containerPort: 6379, name: gcs}
            - {containerPort: 8265, name: dashboard}
            - {containerPort: 10001, name: client}
      volumes:
        {{- include "rr.rayVolumes" (dict "root" $root "configMap" .configMap "shm" "") | nindent 8 }}
workerGroupSpecs:
  - {{- include "rr.workerGroup" (dict "root" $root "name" "generation" "group" $ray.generation "maxReplicas" .generationMax "gpus" (ternary $ray.generation.gpus 0 .gpu) "configMap" .configMap) | nindent 4 }}
  - {{- include "rr.workerGroup" (dict "root" $root "name" "training" "group" $ray.training "maxReplicas" .trainingMax "gpus" (ternary $ray.training.gpus 0 .gpu) "configMap" .configMap) | nindent 4 }}
{{- end -}}
