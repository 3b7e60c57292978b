package k8s

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/sous-run/sous/integration/itest"
	"github.com/sous-run/sous/internal/wire"
)

// workerImage is what `make images` builds; the node loads it from Docker.
const workerImage = "sous-worker:dev"

// TestNodeRunsAPod is the first step of issue 23: a real kube-scheduler
// and kubelet (with a private containerd) beside the control plane, and
// one host-network sous-worker pod from the local image, scheduled,
// Running, and Ready by its own /readyz probe (the real broker connected,
// the engine, an Ollama stand-in in this test, answering with the model),
// with its service-account token mounted (one the apiserver takes as the
// pod's ServiceAccount), answering one request from the real broker, then
// deleted: the kubelet stops its container. Opt-in: SOUS_K8S_NODE=1.
func TestNodeRunsAPod(t *testing.T) {
	nb := NeedNode(t) // first: without SOUS_K8S_NODE=1 the test skips, even in CI
	b := NeedControlPlane(t)
	if out, err := exec.Command("docker", "image", "inspect", "-f", "{{.Id}}", workerImage).CombinedOutput(); err != nil {
		t.Fatalf("k8s: %s is not in the local Docker engine (make images): %v: %s", workerImage, err, out)
	}
	ch, queue := testQueue(t)
	results := queue + ".results"
	t.Cleanup(func() {
		_, _ = ch.QueueDelete(results, false, false, false)
		_, _ = ch.QueueDelete(queue+".dlq", false, false, false)
	})
	engine := ollamaStandIn(t)

	began := time.Now()
	c := Start(t, b, Options{Controllers: []string{DeploymentController, ReplicaSetController, NodeLifecycleController, ServiceAccountController, RootCAPublisher}})
	n := c.StartNode(t, nb, workerImage)
	t.Logf("k8s: control plane and node ready in %s", time.Since(began).Round(100*time.Millisecond))

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	const ns = "node-test"
	if _, err := c.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// The serviceaccount controller makes the namespace's "default"
	// ServiceAccount; the pod waits for it or admission refuses the pod.
	itest.WaitUntil(t, time.Minute, "the default ServiceAccount", func() bool {
		_, err := c.Client.CoreV1().ServiceAccounts(ns).Get(ctx, "default", metav1.GetOptions{})
		return err == nil
	})

	httpPort := itest.FreePort(t)
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "sous-worker", Namespace: ns},
		Spec: corev1.PodSpec{
			HostNetwork:                   true,
			TerminationGracePeriodSeconds: new(int64(10)),
			Containers: []corev1.Container{{
				Name:            "worker",
				Image:           workerImage,
				ImagePullPolicy: corev1.PullNever,
				Env: []corev1.EnvVar{
					{Name: "SOUS_AMQP_URL", Value: amqpURL},
					{Name: "SOUS_QUEUE", Value: queue},
					{Name: "SOUS_RESULTS_QUEUE", Value: results},
					{Name: "SOUS_ENGINE_URL", Value: engine},
					{Name: "SOUS_MODEL", Value: "tiny"},
					{Name: "SOUS_HTTP_ADDR", Value: "127.0.0.1:" + strconv.Itoa(httpPort)},
				},
				ReadinessProbe: &corev1.Probe{
					ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{
						Host: "127.0.0.1", Path: "/readyz", Port: intstr.FromInt(httpPort),
					}},
					PeriodSeconds: 1,
				},
			}},
		},
	}
	created := time.Now()
	if _, err := c.Client.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	var scheduled, running, ready time.Duration
	if !itest.Eventually(3*time.Minute, func() bool {
		p, err := c.Client.CoreV1().Pods(ns).Get(ctx, pod.Name, metav1.GetOptions{})
		if err != nil {
			return false
		}
		if scheduled == 0 && p.Spec.NodeName != "" {
			scheduled = time.Since(created)
		}
		if running == 0 && p.Status.Phase == corev1.PodRunning {
			running = time.Since(created)
		}
		for _, cond := range p.Status.Conditions {
			if cond.Type == corev1.PodReady && cond.Status == corev1.ConditionTrue {
				ready = time.Since(created)
				return true
			}
		}
		return false
	}) {
		p, _ := c.Client.CoreV1().Pods(ns).Get(ctx, pod.Name, metav1.GetOptions{})
		t.Fatalf("pod not Ready in 3m (scheduled %s, running %s): status %+v\n%s", scheduled, running, p.Status, n.Logs(30))
	}
	t.Logf("k8s: pod created → scheduled on %s %s → Running %s → Ready %s", NodeName,
		scheduled.Round(100*time.Millisecond), running.Round(100*time.Millisecond), ready.Round(100*time.Millisecond))

	// The kubelet mounted the pod's projected service-account token (a
	// TokenRequest to the apiserver): the apiserver takes it as the pod's
	// ServiceAccount.
	p, err := c.Client.CoreV1().Pods(ns).Get(ctx, pod.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	tokens, _ := filepath.Glob(filepath.Join(n.Dir, "kubelet", "pods", string(p.UID), "volumes", "kubernetes.io~projected", "*", "token"))
	if len(tokens) != 1 {
		t.Fatalf("the pod's projected token: found %v", tokens)
	}
	token, err := os.ReadFile(tokens[0])
	if err != nil {
		t.Fatal(err)
	}
	asPod := rest.AnonymousClientConfig(c.Config)
	asPod.BearerToken = string(token)
	podClient, err := kubernetes.NewForConfig(asPod)
	if err != nil {
		t.Fatal(err)
	}
	review, err := podClient.AuthenticationV1().SelfSubjectReviews().Create(ctx, &authnv1.SelfSubjectReview{}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("the pod's token: %v", err)
	}
	if want := "system:serviceaccount:" + ns + ":default"; review.Status.UserInfo.Username != want {
		t.Fatalf("the pod's token is %q, want %q", review.Status.UserInfo.Username, want)
	}
	t.Logf("k8s: the pod's projected token authenticates as %s", review.Status.UserInfo.Username)

	// The pod does work: one request through the real broker, answered by
	// the worker in the pod (the stand-in engine echoes the prompt).
	published := time.Now()
	if err := ch.PublishWithContext(ctx, "", queue, false, false, amqp.Publishing{
		MessageId: "node-1", ContentType: "application/json", DeliveryMode: amqp.Persistent,
		Body: []byte(`{"prompt":"node-1","options":{"num_predict":4}}`),
	}); err != nil {
		t.Fatal(err)
	}
	var res wire.Result
	itest.WaitUntil(t, time.Minute, "the pod's result for node-1", func() bool {
		d, ok, err := ch.Get(results, true)
		if err != nil || !ok {
			return false
		}
		if err := json.Unmarshal(d.Body, &res); err != nil {
			t.Fatalf("result %s: %v", d.Body, err)
		}
		return true
	})
	if res.ID != "node-1" || res.Status != wire.StatusOK || res.Response == nil || *res.Response != "echo:node-1" {
		t.Fatalf("result: %+v", res)
	}
	t.Logf("k8s: the pod answered node-1 (worker %s) in %s", res.Worker, time.Since(published).Round(100*time.Millisecond))

	deleted := time.Now()
	if err := c.Client.CoreV1().Pods(ns).Delete(ctx, pod.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	itest.WaitUntil(t, time.Minute, "the kubelet to stop the pod and the pod to be gone", func() bool {
		_, err := c.Client.CoreV1().Pods(ns).Get(ctx, pod.Name, metav1.GetOptions{})
		return apierrors.IsNotFound(err)
	})
	t.Logf("k8s: pod deleted and gone in %s", time.Since(deleted).Round(100*time.Millisecond))
}

// ollamaStandIn serves the part of Ollama's API that the worker's
// readiness asks (version, the model list) and a generate that echoes the
// prompt, on loopback, where a
// host-network pod reaches it; it returns its URL.
func ollamaStandIn(t *testing.T) string {
	t.Helper()
	mux := http.NewServeMux()
	mux.HandleFunc("GET /api/version", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte(`{"version":"0.6.5"}`))
	})
	mux.HandleFunc("GET /api/tags", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte(`{"models":[{"name":"tiny:latest","model":"tiny:latest"}]}`))
	})
	mux.HandleFunc("GET /", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("Ollama is running")) })
	mux.HandleFunc("POST /api/generate", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Model  string `json:"model"`
			Prompt string `json:"prompt"`
		}
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			http.Error(w, `{"error":"bad request"}`, http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "application/x-ndjson")
		_ = json.NewEncoder(w).Encode(map[string]any{
			"model": req.Model, "created_at": time.Now().UTC().Format(time.RFC3339Nano),
			"response": "echo:" + req.Prompt, "done": true, "done_reason": "stop",
			"prompt_eval_count": 1, "eval_count": 1,
		})
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })
	return fmt.Sprintf("http://%s", ln.Addr())
}
