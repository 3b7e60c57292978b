package deploy_test

import (
	"errors"
	"testing"
)

// setup loads the KEDA schemas and every manifest under deploy/.
func setup(t *testing.T) (*kedaSchemas, tree) {
	t.Helper()
	ks := loadKEDA(t)
	tr := loadTree(t, []string{".yaml", ".yml"})
	if len(tr) == 0 {
		t.Fatal("no manifests under deploy/")
	}
	return ks, tr
}

func TestManifests(t *testing.T) {
	t.Parallel()
	ks, tr := setup(t)
	if errs := validateTree(ks, tr); len(errs) > 0 {
		t.Fatalf("%d problems:\n%v", len(errs), errors.Join(errs...))
	}
}

// TestManifestChecksCatchBrokenCopies breaks one thing at a time in a copy of
// the manifests and expects the validator to name it. A case with want == ""
// is a change that must still pass, so the checks are not over-eager.
func TestManifestChecksCatchBrokenCopies(t *testing.T) {
	t.Parallel()
	ks, good := setup(t)

	const (
		base     = "deploy/k8s/base/"
		rabbit   = "deploy/k8s/overlays/rabbitmq/"
		sbus     = "deploy/k8s/overlays/servicebus/"
		kedaRMQ  = "deploy/keda/rabbitmq/"
		kedaSB   = "deploy/keda/servicebus/"
		deployF  = base + "deployment.yaml"
		configF  = base + "configmap.yaml"
		rmqSO    = kedaRMQ + "scaledobject.yaml"
		sbSO     = kedaSB + "scaledobject.yaml"
		rmqTA    = kedaRMQ + "triggerauthentication.yaml"
		baseKust = base + "kustomization.yaml"
		scalerSO = "deploy/k8s/overlays/rabbitmq-scaler/scaledobject.yaml"
	)
	tests := []struct {
		name string
		m    mutation
		want string
	}{
		// Strict decoding of built-in kinds.
		{"unknown field", mutation{deployF, "enableServiceLinks: false", "enableServiceLink: false"}, `unknown field "spec.template.spec.enableServiceLink"`},
		{"miscased field", mutation{deployF, "imagePullPolicy: IfNotPresent", "ImagePullPolicy: IfNotPresent"}, `unknown field "spec.template.spec.containers[0].ImagePullPolicy"`},
		{"unquoted number in ConfigMap", mutation{configF, "\n  SOUS_BATCH_MAX: \"32\"", "\n  SOUS_BATCH_MAX: 32"}, "cannot unmarshal number into Go struct field ConfigMap.data of type string"},
		{"unquoted number in env", mutation{rabbit + "deployment.yaml", "          env:\n", "          env:\n            - name: SOUS_BATCH_MAX\n              value: 5\n"}, "of type string"},
		{"duplicate key", mutation{deployF, "  revisionHistoryLimit: 3\n", "  revisionHistoryLimit: 3\n  revisionHistoryLimit: 5\n"}, `"revisionHistoryLimit" already set`},
		{"bad quantity", mutation{deployF, "memory: 16Gi\n              ephemeral-storage: 2Gi", "memory: 16 GiB\n              ephemeral-storage: 2Gi"}, "quantities must match the regular expression"},
		{"invalid label", mutation{base + "pvc.yaml", "app.kubernetes.io/component: models", "app.kubernetes.io/component: -models"}, "metadata.labels"},
		{"unknown kind", mutation{base + "pdb.yaml", "apiVersion: policy/v1", "apiVersion: policy/v1beta1"}, `no validator for apiVersion "policy/v1beta1"`},

		// The worker Deployment.
		{"missing GPU limit", mutation{deployF, "              nvidia.com/gpu: 1\n", ""}, "no nvidia.com/gpu in resources.limits"},
		{"no memory request", mutation{deployF, "              memory: 16Gi\n              ephemeral-storage: 2Gi\n", "              ephemeral-storage: 2Gi\n"}, "no memory request"},
		{"grace period too short", mutation{deployF, "terminationGracePeriodSeconds: 180", "terminationGracePeriodSeconds: 140"}, "terminationGracePeriodSeconds 140 must exceed SOUS_DRAIN_TIMEOUT (25s) + longest batch, SOUS_ENGINE_TIMEOUT (2m0s)"},
		{"drain timeout raised past the grace period", mutation{configF, "SOUS_DRAIN_TIMEOUT: 25s", "SOUS_DRAIN_TIMEOUT: 90s"}, "must exceed SOUS_DRAIN_TIMEOUT (1m30s)"},
		{"engine timeout raised past the grace period", mutation{configF, "SOUS_ENGINE_TIMEOUT: 120s", "SOUS_ENGINE_TIMEOUT: 5m"}, "longest batch, SOUS_ENGINE_TIMEOUT (5m0s)"},
		{"engine timeout unset", mutation{configF, "  SOUS_ENGINE_TIMEOUT: 120s\n", ""}, "SOUS_ENGINE_TIMEOUT"},
		{"replicas set", mutation{deployF, "  revisionHistoryLimit: 3\n", "  replicas: 1\n  revisionHistoryLimit: 3\n"}, "spec.replicas is set"},
		{"liveness path", mutation{deployF, "path: /healthz\n              port: http\n            periodSeconds: 10", "path: /livez\n              port: http\n            periodSeconds: 10"}, `livenessProbe path "/livez", want /healthz`},
		{"readiness port", mutation{deployF, "path: /readyz\n              port: http", "path: /readyz\n              port: 9090"}, "readinessProbe port 9090 is not 8080"},
		{"no scrape annotation", mutation{deployF, `prometheus.io/scrape: "true"`, `prometheus.io/scrape: "false"`}, "prometheus.io/scrape"},
		{"no GPU toleration", mutation{deployF, "        - key: nvidia.com/gpu\n", "        - key: example.com/gpu\n"}, "no toleration for nvidia.com/gpu"},
		{"engine slots differ", mutation{configF, `OLLAMA_NUM_PARALLEL: "32"`, `OLLAMA_NUM_PARALLEL: "2"`}, `SOUS_ENGINE_PARALLEL "32" and OLLAMA_NUM_PARALLEL "2" differ`},
		{"models not on the PVC", mutation{configF, "OLLAMA_MODELS: /models", "OLLAMA_MODELS: /data/models"}, "no PersistentVolumeClaim mounted at OLLAMA_MODELS (/data/models)"},
		{"secret in the ConfigMap", mutation{rabbit + "config.yaml", "SOUS_BROKER: rabbitmq", "SOUS_BROKER: rabbitmq\n  SOUS_AMQP_URL: amqp://sous:pw@rabbitmq:5672/"}, "ConfigMap key SOUS_AMQP_URL looks like a secret"},
		{"secret as a literal env", mutation{rabbit + "deployment.yaml", "              valueFrom:\n                secretKeyRef:\n                  name: sous-rabbitmq\n                  key: amqp-url\n", "              value: amqp://sous:pw@rabbitmq:5672/\n"}, "env SOUS_AMQP_URL looks like a secret"},
		{"secret key not documented", mutation{rabbit + "deployment.yaml", "key: amqp-url", "key: url"}, "reads key url of Secret sous-rabbitmq"},
		{"service account token mounted", mutation{base + "serviceaccount.yaml", "automountServiceAccountToken: false", "automountServiceAccountToken: true"}, "automountServiceAccountToken must be false"},
		{"job mounts a token", mutation{"deploy/k8s/jobs/model-pull.yaml", "automountServiceAccountToken: false", "automountServiceAccountToken: true"}, "the job does not call the Kubernetes API"},

		// Busy-aware scale-in: the pod patches its own pod-deletion-cost.
		{"worker pod without a token", mutation{deployF, "      automountServiceAccountToken: true\n", "      automountServiceAccountToken: false\n"}, "automountServiceAccountToken must be true on the worker's pod"},
		{"no downward pod name", mutation{deployF, "- name: POD_NAME\n              valueFrom:\n                fieldRef:\n                  fieldPath: metadata.name", "- name: POD_NAME\n              valueFrom:\n                fieldRef:\n                  fieldPath: metadata.uid"}, "no env POD_NAME from the downward API"},
		{"role allows more", mutation{base + "role.yaml", "verbs: [patch]", "verbs: [patch, get, list]"}, "allows more than patch on pods"},
		{"role on another resource", mutation{base + "role.yaml", "resources: [pods]", "resources: [deployments]"}, "allows more than patch on pods"},
		{"binding to another account", mutation{base + "rolebinding.yaml", "    name: sous-worker\n", "    name: default\n"}, "no RoleBinding gives ServiceAccount sous-worker a Role"},
		{"no binding", mutation{base + "kustomization.yaml", "  - rolebinding.yaml\n", ""}, "no RoleBinding"},

		// securityContext.
		{"writable root filesystem", mutation{deployF, "readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false"}, "readOnlyRootFilesystem must be true"},
		{"may run as root", mutation{deployF, "        runAsNonRoot: true\n        runAsUser: 65532\n", ""}, "container worker: runAsUser must be a non-zero UID"},
		{"capabilities kept", mutation{deployF, "                - ALL", "                - NET_RAW"}, "capabilities must drop ALL"},
		{"privilege escalation", mutation{deployF, "allowPrivilegeEscalation: false", "allowPrivilegeEscalation: true"}, "allowPrivilegeEscalation must be false"},
		{"no /tmp", mutation{deployF, "mountPath: /tmp", "mountPath: /scratch"}, "without an emptyDir at /tmp"},
		{"job runs as root", mutation{"deploy/k8s/jobs/model-pull.yaml", "runAsUser: 65532", "runAsUser: 0"}, "sous-model-pull: container pull: runAsUser must be a non-zero UID"},
		{"job image differs", mutation{"deploy/k8s/jobs/model-pull.yaml", "image: sous-worker-ollama", "image: sous-worker"}, "want the workers' image"},

		// PodDisruptionBudget.
		{"PDB minAvailable", mutation{base + "pdb.yaml", "maxUnavailable: 1", "minAvailable: 1"}, "minAvailable blocks every drain"},
		{"PDB selects nothing", mutation{base + "pdb.yaml", "      app.kubernetes.io/component: worker", "      app.kubernetes.io/component: workers"}, "selector matches no Deployment's pods"},

		// KEDA objects against the CRD schema.
		{"ScaledObject unknown field", mutation{rmqSO, "cooldownPeriod: 600", "coolDownPeriod: 600"}, "additional properties 'coolDownPeriod' not allowed"},
		{"ScaledObject wrong type", mutation{rmqSO, "minReplicaCount: 0", `minReplicaCount: "0"`}, "got string, want integer"},
		{"ScaledObject below the schema minimum", mutation{rmqSO, "maxReplicaCount: 4", "maxReplicaCount: 0"}, "minimum: got 0, want 1"},
		{"ScaledObject min above max", mutation{sbSO, "minReplicaCount: 0", "minReplicaCount: 5"}, "minReplicaCount must be less than or equal to maxReplicaCount"},
		{"HPA policy missing a field", mutation{rmqSO, "            - type: Pods\n              value: 1\n              periodSeconds: 120", "            - type: Pods\n              value: 1"}, "missing property 'periodSeconds'"},
		{"TriggerAuthentication bad provider", mutation{kedaSB + "triggerauthentication.yaml", "provider: azure-workload", "provider: azure"}, "value must be one of"},
		{"ObjectMeta unknown field", mutation{rmqSO, "  name: sous-worker\n  labels:", "  name: sous-worker\n  label: {}\n  labels:"}, `unknown field "label"`},

		// Trigger metadata against scalers-schema.json.
		{"bad trigger key", mutation{rmqSO, "queueName: sous.requests", "queuename: sous.requests"}, `unknown metadata key "queuename"`},
		{"required key missing", mutation{rmqSO, "        queueName: sous.requests\n", ""}, `required parameter "queueName" not given`},
		{"auth-only key in metadata", mutation{rmqSO, "        protocol: http\n", "        protocol: http\n        password: hunter2\n"}, `metadata key "password" is read only from a TriggerAuthentication`},
		{"value not allowed", mutation{sbSO, `activationMessageCount: "0"`, "activationMessageCount: \"0\"\n        operation: median"}, `"median" not one of [sum max avg]`},
		{"FromEnv name missing", mutation{sbSO, `messageCount: "96"`, "messageCount: \"96\"\n        connectionFromEnv: SOUS_SB_CONNECTION"}, "connectionFromEnv: SOUS_SB_CONNECTION is not in the env of container worker"},
		{"FromEnv name present", mutation{sbSO, `messageCount: "96"`, "messageCount: \"96\"\n        connectionFromEnv: SOUS_SERVICEBUS_CONNECTION_STRING"}, ""},
		{"FromEnv for a key that has none", mutation{rmqSO, "        protocol: http\n", "        protocol: http\n        queueNameFromEnv: SOUS_QUEUE\n"}, "queueNameFromEnv: queueName cannot be read from the environment"},
		{"unknown trigger type", mutation{sbSO, "type: azure-servicebus", "type: azure-service-bus"}, "unknown trigger type"},
		{"auth parameter not read", mutation{rmqTA, "parameter: host", "parameter: hostname"}, `gives parameter "hostname", which rabbitmq does not read`},
		{"auth secret key not documented", mutation{rmqTA, "      key: password", "      key: pass"}, "reads key pass of Secret sous-keda-rabbitmq"},
		{"auth reference dangling", mutation{rmqSO, "name: sous-rabbitmq-management", "name: sous-rabbitmq-mgmt"}, "authenticationRef TriggerAuthentication sous-rabbitmq-mgmt is not in the set"},

		// Scale-to-zero rules.
		{"amqp protocol", mutation{rmqSO, "protocol: http", "protocol: amqp"}, `protocol "amqp", want http`},
		{"unacked excluded", mutation{rmqSO, "        protocol: http\n", "        protocol: http\n        excludeUnacknowledged: \"true\"\n"}, "excludeUnacknowledged drops the in-flight batch"},
		{"value not the worker's capacity", mutation{rmqSO, `value: "96"`, `value: "64"`}, `value "64", want 96 = worker.Capacity`},
		{"batch size changed alone", mutation{configF, "\n  SOUS_BATCH_MAX: \"32\"", "\n  SOUS_BATCH_MAX: \"16\""}, `messageCount "96", want 48 = worker.Capacity`},
		{"slots changed alone", mutation{configF, `SOUS_ENGINE_PARALLEL: "32"`, `SOUS_ENGINE_PARALLEL: "8"`}, `value "96", want 40`},
		{"activation strands messages", mutation{rmqSO, `activationValue: "0"`, `activationValue: "5"`}, `activationValue "5" with minReplicaCount 0 strands`},
		{"queue mismatch", mutation{sbSO, "queueName: sous.requests", "queueName: sous.request"}, `queueName "sous.request" is not SOUS_QUEUE "sous.requests"`},
		{"lane without a trigger", mutation{"deploy/k8s/overlays/rabbitmq-lanes/scaledobject.yaml", "queueName: sous.bulk", "queueName: sous.interactive"}, `lane bulk's queue "sous.bulk" has no trigger`},
		{"trigger on no lane", mutation{"deploy/k8s/overlays/rabbitmq-lanes/scaledobject.yaml", "queueName: sous.bulk", "queueName: sous.nightly"}, `queueName "sous.nightly" is not a lane's queue in SOUS_LANES`},
		// The external trigger of the work-aware scaler (scaler_test.go).
		{"scaler address wrong", mutation{scalerSO, "scalerAddress: sous-scaler.sous-rabbitmq.svc:9090", "scalerAddress: sous-scaler.sous-rabbitmq.svc:8083"}, "port 8083 of Service sous-scaler does not reach the scaler's gRPC port 9090"},
		{"scaler address names another Service", mutation{scalerSO, "scalerAddress: sous-scaler.sous-rabbitmq.svc:9090", "scalerAddress: sous-gateway.sous-rabbitmq.svc:9090"}, "Service sous-gateway selects no scaler Deployment"},
		{"targetDrainSeconds missing", mutation{scalerSO, "        targetDrainSeconds: \"300\"\n", ""}, "metadata targetDrainSeconds is required"},
		{"scaler queue not a lane", mutation{scalerSO, "queue: sous.requests", "queue: sous.requests,sous.bulk"}, `queue "sous.bulk" is not SOUS_QUEUE "sous.requests"`},
		{"scaler queue misses the lane", mutation{scalerSO, "queue: sous.requests", "queue: sous.request"}, `lane default's queue "sous.requests" has no trigger`},
		{"namespace mismatch", mutation{sbus + "config.yaml", "sous-example.servicebus.windows.net", "sous-prod.servicebus.windows.net"}, `namespace "sous-example" is not the one of SOUS_SERVICEBUS_NAMESPACE`},
		{"not scaling to zero", mutation{rmqSO, "minReplicaCount: 0", "minReplicaCount: 1"}, "minReplicaCount must be 0"},
		{"cooldown shorter than keep-alive", mutation{rmqSO, "cooldownPeriod: 600", "cooldownPeriod: 240"}, "cooldownPeriod 4m0s must be longer than the model keep-alive (5m0s)"},
		{"keep-alive forever", mutation{configF, "OLLAMA_KEEP_ALIVE: 5m", `OLLAMA_KEEP_ALIVE: "-1"`}, "OLLAMA_KEEP_ALIVE is negative"},
		{"worker keep-alive overrides", mutation{configF, "OLLAMA_KEEP_ALIVE: 5m", "OLLAMA_KEEP_ALIVE: 5m\n  SOUS_ENGINE_KEEP_ALIVE: 15m"}, "cooldownPeriod 10m0s must be longer than the model keep-alive (15m0s)"},
		{"shorter keep-alive is fine", mutation{configF, "OLLAMA_KEEP_ALIVE: 5m", "OLLAMA_KEEP_ALIVE: 1m"}, ""},
		{"cooldown shorter than the longest batch", mutation{configF, "SOUS_ENGINE_TIMEOUT: 120s", "SOUS_ENGINE_TIMEOUT: 11m"}, "cooldownPeriod 10m0s must be longer than the longest batch, SOUS_ENGINE_TIMEOUT (11m0s)"},
		{"fast scale down", mutation{sbSO, "              value: 1\n              periodSeconds: 120", "              value: 4\n              periodSeconds: 120"}, "scale down too fast"},
		{"short stabilization", mutation{rmqSO, "stabilizationWindowSeconds: 300", "stabilizationWindowSeconds: 30"}, "stabilizationWindowSeconds must be at least 300"},
		{"wrong scale target", mutation{sbSO, "    name: sous-worker\n  pollingInterval", "    name: sous-workers\n  pollingInterval"}, "scaleTargetRef sous-workers is not a Deployment in the set"},

		// Kustomizations and examples.
		{"missing resource", mutation{baseKust, "  - pdb.yaml", "  - pdbs.yaml"}, "pdbs.yaml does not exist"},
		{"kustomization unknown field", mutation{rabbit + "kustomization.yaml", "patches:", "patchez:"}, `unknown field "patchez"`},
		{"example applied", mutation{rabbit + "kustomization.yaml", "  - ../../../keda/rabbitmq\n", "  - ../../../keda/rabbitmq\n  - secret.example.yaml\n"}, "applies example secret.example.yaml"},
		{"overlay without KEDA", mutation{sbus + "kustomization.yaml", "  - ../../../keda/servicebus\n", ""}, "kustomize build deploy/k8s/overlays/servicebus: no ScaledObject"},
		{"patch breaks a rendered object", mutation{rabbit + "deployment.yaml", "          env:\n", "          resources:\n            limits:\n              nvidia.com/gpu: 0\n          env:\n"}, "kustomize build deploy/k8s/overlays/rabbitmq: Deployment sous-worker: container worker: no nvidia.com/gpu in resources.limits"},
		{"real password in an example", mutation{rabbit + "secret.example.yaml", "REPLACE-WITH-THE-WORKER-PASSWORD", "hunter2"}, `key amqp-url holds no "REPLACE-WITH-" placeholder`},
		{"secret outside an example", mutation{base + "secret.yaml", "", "apiVersion: v1\nkind: Secret\nmetadata:\n  name: sous-rabbitmq\nstringData:\n  amqp-url: REPLACE-WITH-X\n"}, "outside a *.example.yaml file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			requireErr(t, validateTree(ks, tt.m.apply(t, good)), tt.want)
		})
	}
}

// TestKEDASchemas makes sure the schemas say what the checks rely on, so a
// newer schema that drops a key or a rule shows up here first.
func TestKEDASchemas(t *testing.T) {
	t.Parallel()
	ks := loadKEDA(t)
	for _, kind := range []string{"ScaledObject", "ScaledJob", "TriggerAuthentication", "ClusterTriggerAuthentication"} {
		if ks.crds[kind] == nil {
			t.Errorf("no CRD schema for %s", kind)
		}
	}
	for typ, keys := range map[string][]string{
		"rabbitmq":         {"protocol", "mode", "value", "activationValue", "queueName", "host", "excludeUnacknowledged"},
		"azure-servicebus": {"messageCount", "activationMessageCount", "queueName", "namespace", "connection"},
	} {
		for _, k := range keys {
			if _, ok := ks.scalers[typ][k]; !ok {
				t.Errorf("scaler %s has no parameter %s", typ, k)
			}
		}
	}
	if !ks.scalers["rabbitmq"]["host"].TriggerAuthenticationVariableReadable {
		t.Error("rabbitmq host is not readable from a TriggerAuthentication")
	}
}

// TestCRDListTypes: x-kubernetes-list-type "map" and "set" are enforced. Only
// the ScaledJob CRD uses them (its pod template), so it is tested directly.
func TestCRDListTypes(t *testing.T) {
	t.Parallel()
	ks := loadKEDA(t)
	job := func(containers string) []byte {
		return []byte(`{"apiVersion":"keda.sh/v1alpha1","kind":"ScaledJob","metadata":{"name":"j"},
			"spec":{"jobTargetRef":{"template":{"spec":{"containers":` + containers + `}}},
			"triggers":[{"type":"rabbitmq","metadata":{"queueName":"q"}}]}}`)
	}
	tests := []struct {
		name, containers, want string
	}{
		{"distinct names", `[{"name":"a","image":"x"},{"name":"b","image":"x"}]`, ""},
		{"same name twice", `[{"name":"a","image":"x"},{"name":"a","image":"y"}]`, "have the same [name] in a list of type map"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			requireErr(t, ks.validateKEDA("ScaledJob", job(tt.containers)), tt.want)
		})
	}
}
