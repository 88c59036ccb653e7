{{/* Name of the chart, or nameOverride. */}}
{{- define "gpupool.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: the release name if it already contains the chart name, else release-chart. */}}
{{- define "gpupool.fullname" -}}
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

{{- define "gpupool.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "gpupool.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gpupool.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "gpupool.labels" -}}
helm.sh/chart: {{ include "gpupool.chart" . }}
{{ include "gpupool.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "gpupool.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "gpupool.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "gpupool.leaseName" -}}
{{- default (printf "%s-leader" (include "gpupool.fullname" .)) .Values.leaderElection.leaseName -}}
{{- end -}}

{{- define "gpupool.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
The one namespace the operator watches ("" = all), after checking the values: the binary
watches one namespace or all, and several replicas without leader election would all reconcile.
*/}}
{{- define "gpupool.watchNamespace" -}}
{{- $ns := .Values.watchNamespaces | default list -}}
{{- if gt (len $ns) 1 -}}
{{- fail (printf "watchNamespaces has %d entries, but one operator watches one namespace or all of them: install one release per namespace, each with its own clusterId" (len $ns)) -}}
{{- end -}}
{{- if and (gt (int .Values.replicas) 1) (not .Values.leaderElection.enabled) -}}
{{- fail "replicas > 1 needs leaderElection.enabled=true: replicas without a leader would all reconcile the same objects" -}}
{{- end -}}
{{- if $ns -}}{{- first $ns -}}{{- end -}}
{{- end -}}

{{/*
The rules the operator needs in every namespace it watches. Least privilege: each verb is
there because the operator makes that request (src/controller/); nothing else is granted.
*/}}
{{- define "gpupool.watchedRules" -}}
# GpuPools: the pool reconciler lists and watches them (its cache) and gets them; patch adds and
# removes the gpupool.dev/instances finalizer (merge patch, and the kube finalizer helper's
# JSON patch). No create, update or delete: pools belong to the user.
- apiGroups: [gpupool.dev]
  resources: [gpupools]
  verbs: [get, list, watch, patch]
# GpuInstances: create (a pool records a machine as a GpuInstance before renting it), delete
# (idle teardown at the deadline with a resourceVersion precondition, failed provisioning, the
# pool's own deletion), patch (the gpupool.dev/destroy-machine finalizer).
- apiGroups: [gpupool.dev]
  resources: [gpuinstances]
  verbs: [get, list, watch, create, patch, delete]
# VideoJobs: patch (the job finalizer that cancels serverless runs), delete
# (ttlSecondsAfterFinished). No create: jobs belong to the user.
- apiGroups: [gpupool.dev]
  resources: [videojobs]
  verbs: [get, list, watch, patch, delete]
# Status of all three kinds, written by server-side apply (a PATCH of /status) under the
# "gpupool" field manager. No update: the operator never PUTs status.
- apiGroups: [gpupool.dev]
  resources: [gpupools/status, gpuinstances/status, videojobs/status]
  verbs: [patch]
# Secrets, read one by one by name: the provider API keys, worker keys and worker secrets
# named by pools (credentialsSecretRef, apiKeySecretRef, worker.env valueFrom.secretKeyRef)
# and the per-instance session-token Secrets.
# No list or watch, so the operator never sees a Secret that nothing names.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
# The session-token Secret gpupool-session-<instance uid> of each GpuInstance: created when
# the machine is rented, deleted when it is destroyed. resourceNames cannot narrow this:
# create is never checked against names, and the names depend on UIDs.
- apiGroups: [""]
  resources: [secrets]
  verbs: [create, delete]
# Events for every transition: kube-rs's Recorder publishes events.k8s.io/v1 Events (create,
# then patch to count a repeated event).
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
# The same for core/v1 Events, for recorders that fall back to the older API.
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
{{- end -}}

{{/*
The gateway's objects are named "<full name>-gateway". Their selector labels differ from the
operator's in app.kubernetes.io/name, so the operator's Deployment, Service, ServiceMonitor and
NetworkPolicy, which select by name and instance, never pick the gateway's Pods.
*/}}
{{- define "gpupool.gateway.fullname" -}}
{{- printf "%s-gateway" (include "gpupool.fullname" . | trunc 55 | trimSuffix "-") -}}
{{- end -}}

{{- define "gpupool.gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-gateway" (include "gpupool.name" . | trunc 55 | trimSuffix "-") }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "gpupool.gateway.labels" -}}
helm.sh/chart: {{ include "gpupool.chart" . }}
{{ include "gpupool.gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: gateway
app.kubernetes.io/part-of: {{ include "gpupool.name" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "gpupool.gateway.serviceAccountName" -}}
{{- if .Values.gateway.serviceAccount.create -}}
{{- default (include "gpupool.gateway.fullname" .) .Values.gateway.serviceAccount.name -}}
{{- else -}}
{{- required "gateway.serviceAccount.name is required when gateway.serviceAccount.create is false" .Values.gateway.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
The namespace the gateway creates VideoJobs in (--namespace): gateway.namespace, else the one
watched namespace, else the release namespace. Refused when the operator does not watch it:
nothing would ever run the jobs the gateway creates there.
*/}}
{{- define "gpupool.gateway.namespace" -}}
{{- $watch := include "gpupool.watchNamespace" . -}}
{{- $ns := .Values.gateway.namespace | default $watch | default .Release.Namespace -}}
{{- if and $watch (ne $ns $watch) -}}
{{- fail (printf "gateway.namespace %q is not watched by the operator (watchNamespaces: [%s]): nothing would run its jobs; leave it empty or set it to %q" $ns $watch $watch) -}}
{{- end -}}
{{- $ns -}}
{{- end -}}
