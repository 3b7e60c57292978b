package k8s

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/sous-run/sous/integration/itest"
	"github.com/sous-run/sous/integration/ollamatest"
	"github.com/sous-run/sous/internal/wire"
)

// workerOllamaImage is the worker with the dev Ollama (`make images`).
const workerOllamaImage = "sous-worker-ollama:dev"

// engineNodeOverlay is nodeOverlay with the engine back in the worker's
// container, as the overlay ships it: the image sous-worker-ollama:dev,
// SOUS_ENGINE_EXEC "ollama serve", and the model volume a hostPath that
// holds the tiny models (made here, read-only as the overlay mounts it).
// What the test changes besides: Ollama's port (a free one: host
// networking), the models the worker may ask for (tiny and tiny-endless,
// whose answers run to num_predict), streamed chunks of one byte (so a
// long answer is seen running), a 1 s probe period, and one engine slot.
func engineNodeOverlay(queue string, workerPort, apiPort, ollamaPort int, models string) map[string]string {
	files := maps.Clone(nodeOverlay(queue, "http://127.0.0.1:"+strconv.Itoa(ollamaPort), workerPort, apiPort))
	files["k8stest/engine/kustomization.yaml"] = fmt.Sprintf(`apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../node
images:
  - name: sous-worker
    newName: sous-worker-ollama
    newTag: dev
patches:
  - target: {kind: ConfigMap, name: sous-config}
    patch: |-
      - {op: replace, path: /data/SOUS_ENGINE_EXEC, value: ollama serve}
      - {op: replace, path: /data/OLLAMA_HOST, value: "127.0.0.1:%[1]d"}
      - {op: replace, path: /data/SOUS_MODELS_ALLOWED, value: "tiny,%[2]s"}
      - {op: replace, path: /data/SOUS_ENGINE_PARALLEL, value: "1"}
      - {op: replace, path: /data/OLLAMA_NUM_PARALLEL, value: "1"}
      - {op: add, path: /data/SOUS_MAX_NUM_PREDICT, value: "100000"}
      - {op: add, path: /data/SOUS_STREAM_BYTES, value: "1"}
  - target: {kind: Deployment, name: sous-worker}
    patch: |-
      - {op: replace, path: /spec/template/spec/containers/0/readinessProbe/periodSeconds, value: 1}
      - {op: replace, path: /spec/template/spec/containers/0/startupProbe/periodSeconds, value: 1}
      - {op: replace, path: /spec/template/spec/containers/0/startupProbe/failureThreshold, value: 300}
      - {op: replace, path: /spec/template/spec/volumes/0, value: {name: models, hostPath: {path: %[3]q, type: Directory}}}
`, ollamaPort, ollamatest.EndlessModelName, models)
	return files
}

// TestNodeEngineInContainer is the test 2: the rabbitmq overlay's
// worker with its engine in the same container, as shipped
// (sous-worker-ollama:dev, SOUS_ENGINE_EXEC "ollama serve": the dev
// Ollama as the worker's child), the tiny models (made here with the dev
// Ollama, no download) mounted read-only from a hostPath volume. The pod
// becomes Ready only once the model is loaded: when the kubelet first
// reports it Ready, the engine's /api/ps lists it. Then a streamed
// request for the endless tiny model runs (10000 tokens: 10-15 s of work
// here, so it is still running when the test acts); once its first chunk
// is out, the test kills `ollama serve` inside the pod from the host
// (SIGKILL, its pid found through /proc by its OLLAMA_HOST), the worker
// starts a new engine (another pid), and the request is answered: status
// ok, on a later attempt (the stream was handed back with an attempt
// spent, docs/messages.md). Nothing is asserted on the model's words.
func TestNodeEngineInContainer(t *testing.T) {
	nc := setupNode(t)
	if out, err := exec.Command("docker", "image", "inspect", "-f", "{{.Id}}", workerOllamaImage).CombinedOutput(); err != nil {
		t.Fatalf("k8s: %s is not in the local Docker engine (make images): %v: %s", workerOllamaImage, err, out)
	}
	loaded := time.Now()
	if err := nc.n.importImages([]string{workerOllamaImage}); err != nil {
		t.Fatal(err)
	}
	t.Logf("k8s: %s loaded into the node's containerd in %s", workerOllamaImage, time.Since(loaded).Round(100*time.Millisecond))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	// The tiny models, made with the dev Ollama on the host, readable by
	// the pod's user (65532).
	dir, err := os.MkdirTemp("", "sous-models-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	made := time.Now()
	serve, err := ollamatest.Prepare(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil {
			mode := os.FileMode(0o644)
			if d.IsDir() {
				mode = 0o755
			}
			_ = os.Chmod(p, mode)
		}
		return nil
	})
	models := filepath.Join(dir, "models")
	_, portText, _ := net.SplitHostPort(serve.Addr)
	ollamaPort, _ := strconv.Atoi(portText)
	t.Logf("k8s: tiny models made in %s (%s)", models, time.Since(made).Round(100*time.Millisecond))

	files := engineNodeOverlay(nc.queue, itest.FreePort(t), nc.apiPort(t), ollamaPort, models)
	_, applied := nc.applyNodeOverlay(t, ctx, "k8stest/engine", files, rabbitNS, true, notKEDA(false))

	// Ready only with the model loaded: the engine lists it the moment
	// the pod is first seen Ready.
	pod := nc.waitReadyPod(t, ctx, rabbitNS, "app.kubernetes.io/component=worker", 5*time.Minute)
	ps := engineLoaded(t, ollamaPort)
	t.Logf("k8s: worker pod %s Ready %s after the apply; the engine's /api/ps then: %s", pod.Name, time.Since(applied).Round(100*time.Millisecond), ps)
	if !strings.Contains(ps, `"tiny:latest"`) && !strings.Contains(ps, `"tiny"`) {
		t.Fatalf("the pod is Ready but the engine has not loaded the model: /api/ps %s", ps)
	}
	engine := engineServePid(ollamaPort)
	if engine == 0 {
		t.Fatalf("no `ollama serve` with OLLAMA_HOST=127.0.0.1:%d among the host's processes", ollamaPort)
	}

	replies := nc.queue + ".replies"
	if _, err := nc.ch.QueueDeclare(replies, false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = nc.ch.QueueDelete(replies, false, false, false) })
	if err := nc.ch.PublishWithContext(ctx, "", nc.queue, false, false, amqp.Publishing{
		MessageId: "long", ContentType: "application/json", DeliveryMode: amqp.Persistent, ReplyTo: replies,
		Body: []byte(`{"prompt":"go on","model":"` + ollamatest.EndlessModelName + `","stream":true,"options":{"num_predict":10000}}`),
	}); err != nil {
		t.Fatal(err)
	}
	published := time.Now()
	var first amqp.Delivery
	itest.WaitUntil(t, 2*time.Minute, "the first chunk of the long answer", func() bool {
		d, ok, err := nc.ch.Get(replies, true)
		if err != nil || !ok {
			return false
		}
		first = d
		return true
	})
	if first.Headers["x-sous-status"] != "chunk" {
		t.Fatalf("the first reply is not a chunk: %v %s", first.Headers, first.Body)
	}
	if err := syscall.Kill(engine, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	t.Logf("k8s: first chunk %s after the publish; killed ollama serve (pid %d, from the host)", killed.Sub(published).Round(100*time.Millisecond), engine)

	var final wire.Result
	chunks := 1
	itest.WaitUntil(t, 5*time.Minute, "the final answer after the engine's restart", func() bool {
		for {
			d, ok, err := nc.ch.Get(replies, true)
			if err != nil || !ok {
				return false
			}
			if d.Headers["x-sous-status"] == "chunk" {
				chunks++
				continue
			}
			if err := json.Unmarshal(d.Body, &final); err != nil {
				t.Fatalf("final reply %s: %v", d.Body, err)
			}
			return true
		}
	})
	next := engineServePid(ollamaPort)
	t.Logf("k8s: answered %s after the kill: status %s, attempt %d, %d chunks in all; ollama serve now pid %d", time.Since(killed).Round(100*time.Millisecond), final.Status, final.Attempt, chunks, next)
	if final.ID != "long" || final.Status != wire.StatusOK || final.Attempt < 2 {
		t.Fatalf("final result %+v, want long answered ok on attempt 2 or later\n%s", final, nc.containerLog(rabbitNS, pod.Name, "worker"))
	}
	if next == 0 || next == engine {
		t.Fatalf("the engine was not restarted (pid %d before, %d now)", engine, next)
	}
}

// engineLoaded returns the engine's /api/ps (the models loaded) on
// 127.0.0.1:port.
func engineLoaded(t *testing.T, port int) string {
	t.Helper()
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/api/ps", port))
	if err != nil {
		t.Fatalf("the engine's /api/ps: %v", err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return strings.TrimSpace(string(b))
}

// engineServePid finds `ollama serve` with OLLAMA_HOST=127.0.0.1:port
// among the host's processes (a container's are the host's, seen from
// the host's /proc), 0 when there is none.
func engineServePid(port int) int {
	want := []byte("OLLAMA_HOST=127.0.0.1:" + strconv.Itoa(port) + "\x00")
	procs, _ := filepath.Glob("/proc/[0-9]*")
	for _, p := range procs {
		cmd, err := os.ReadFile(filepath.Join(p, "cmdline"))
		if err != nil || !bytes.HasSuffix(bytes.TrimRight(cmd, "\x00"), []byte("ollama\x00serve")) {
			continue
		}
		env, err := os.ReadFile(filepath.Join(p, "environ"))
		if err != nil || !bytes.Contains(append(env, 0), want) {
			continue
		}
		if pid, err := strconv.Atoi(filepath.Base(p)); err == nil {
			return pid
		}
	}
	return 0
}
