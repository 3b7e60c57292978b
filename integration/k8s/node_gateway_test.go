package k8s

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sous-run/sous/integration/itest"
)

// gatewayImage is what `make images` builds for cmd/gateway.
const gatewayImage = "sous-gateway:dev"

// openAIModule returns the ESM entry of the official `openai` npm client
// that integration/gateway pins (node/package.json, package-lock.json),
// running `npm ci` there first when it is missing or another version, as
// integration/gateway's tests do.
func openAIModule(t *testing.T) string {
	t.Helper()
	root, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(root, "integration", "gateway", "node")
	var pkg struct {
		Dependencies map[string]string `json:"dependencies"`
	}
	b, err := os.ReadFile(filepath.Join(dir, "package.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &pkg); err != nil {
		t.Fatalf("%s/package.json: %v", dir, err)
	}
	var got struct {
		Version string `json:"version"`
	}
	b, err = os.ReadFile(filepath.Join(dir, "node_modules", "openai", "package.json"))
	if err != nil || json.Unmarshal(b, &got) != nil || got.Version != pkg.Dependencies["openai"] {
		if _, err := exec.LookPath("npm"); err != nil {
			t.Fatalf("npm is not installed; the gateway test needs Node.js and npm (apt-get install nodejs npm): %v", err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, "npm", "ci", "--no-audit", "--no-fund")
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("npm ci in %s: %v\n%s", dir, err, out)
		}
	}
	return filepath.Join(dir, "node_modules", "openai", "index.mjs")
}

// gatewayNodeOverlay is nodeOverlay (the rabbitmq overlay's worker on this
// node) with the overlay's gateway objects kept and patched only where
// this node forces it: its image (sous-gateway:dev, never pulled), one
// replica (a host-network port is a host port: one such pod per node),
// host networking with its API and probe ports free loopback ports on
// the pod's IP (SOUS_GATEWAY_ADDR and SOUS_HTTP_ADDR, which the shipped
// Deployment sets to :8081 and :8082, every interface), and a 1 s
// readiness period. Its keys Secret is the test's, as the overlay leaves
// it to the operator.
func gatewayNodeOverlay(queue, engine string, workerPort, apiPort, gwAPI, gwHTTP int) map[string]string {
	files := maps.Clone(nodeOverlay(queue, engine, workerPort, apiPort))
	files["k8stest/gateway/kustomization.yaml"] = fmt.Sprintf(`apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../node
images:
  - name: ghcr.io/sous-run/sous-gateway
    newName: sous-gateway
    newTag: dev
patches:
  - target: {kind: Deployment, name: sous-gateway}
    patch: |-
      - {op: replace, path: /spec/replicas, value: 1}
      - {op: add, path: /spec/template/spec/hostNetwork, value: true}
      - {op: replace, path: /spec/template/spec/containers/0/imagePullPolicy, value: Never}
      - {op: test, path: /spec/template/spec/containers/0/ports/0/name, value: api}
      - {op: replace, path: /spec/template/spec/containers/0/ports/0/containerPort, value: %[1]d}
      - {op: test, path: /spec/template/spec/containers/0/ports/1/name, value: http}
      - {op: replace, path: /spec/template/spec/containers/0/ports/1/containerPort, value: %[2]d}
      - {op: replace, path: /spec/template/spec/containers/0/readinessProbe/periodSeconds, value: 1}
      - {op: add, path: /spec/template/spec/containers/0/env/0, value: {name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}}
      - {op: test, path: /spec/template/spec/containers/0/env/2/name, value: SOUS_GATEWAY_ADDR}
      - {op: replace, path: /spec/template/spec/containers/0/env/2/value, value: "$(POD_IP):%[1]d"}
      - {op: test, path: /spec/template/spec/containers/0/env/3/name, value: SOUS_HTTP_ADDR}
      - {op: replace, path: /spec/template/spec/containers/0/env/3/value, value: "$(POD_IP):%[2]d"}
`, gwAPI, gwHTTP)
	return files
}

// TestNodeGatewayOpenAIClient is the test 5: the rabbitmq
// overlay's gateway Deployment (sous-gateway:dev, host network, its own
// ports; gatewayNodeOverlay) and its worker as pods on the node, and the
// official `openai` npm client (the version integration/gateway pins)
// talking to the gateway's pod: one plain chat and one streamed chat,
// through the real RabbitMQ to the worker pod and its engine, an Ollama
// stand-in whose chat answers a scripted sentence. The test asserts the
// responses' OpenAI shape (object, role, finish_reason, usage from the
// engine's counts; chunks of chat.completion.chunk for the stream), that
// the text is the stand-in's sentence, and that the engine got exactly
// the two chats (so the worker pod answered both).
func TestNodeGatewayOpenAIClient(t *testing.T) {
	nc := setupNode(t)
	module := openAIModule(t)
	if out, err := exec.Command("docker", "image", "inspect", "-f", "{{.Id}}", gatewayImage).CombinedOutput(); err != nil {
		t.Fatalf("k8s: %s is not in the local Docker engine (make images): %v: %s", gatewayImage, err, out)
	}
	loaded := time.Now()
	if err := nc.n.importImages([]string{gatewayImage}); err != nil {
		t.Fatal(err)
	}
	t.Logf("k8s: %s loaded into the node's containerd in %s", gatewayImage, time.Since(loaded).Round(100*time.Millisecond))
	engine := startGateStandIn(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	gwAPI, gwHTTP := itest.FreePort(t), itest.FreePort(t)
	files := gatewayNodeOverlay(nc.queue, engine.url, itest.FreePort(t), nc.apiPort(t), gwAPI, gwHTTP)
	const apiKey = "sk-node-gateway-test"
	sum := sha256.Sum256([]byte(apiKey))
	keys := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "sous-gateway-keys", Namespace: rabbitNS},
		StringData: map[string]string{"keys": "node-test " + hex.EncodeToString(sum[:]) + "\n"}}
	_, applied := nc.applyNodeOverlay(t, ctx, "k8stest/gateway", files, rabbitNS, true, notKEDA(true))
	if _, err := nc.c.Client.CoreV1().Secrets(rabbitNS).Create(ctx, keys, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	w := nc.waitReadyPod(t, ctx, rabbitNS, "app.kubernetes.io/component=worker", 3*time.Minute)
	t.Logf("k8s: worker pod %s Ready %s after the apply", w.Name, time.Since(applied).Round(100*time.Millisecond))
	gw := nc.waitReadyPod(t, ctx, rabbitNS, "app.kubernetes.io/component=gateway", 3*time.Minute)
	t.Logf("k8s: gateway pod %s Ready %s after the apply (%s)", gw.Name, time.Since(applied).Round(100*time.Millisecond), gw.Status.PodIP)

	root, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	began := time.Now()
	cmd := exec.CommandContext(ctx, "node", filepath.Join(root, "integration", "k8s", "testdata", "openai-chat.mjs"))
	cmd.Env = append(os.Environ(), "OPENAI_MODULE="+module, fmt.Sprintf("BASE_URL=http://%s:%d/v1", gw.Status.PodIP, gwAPI),
		"API_KEY="+apiKey, "MODEL=tiny")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("node openai-chat.mjs: %v\nstdout:\n%s\nstderr:\n%s\ngateway log:\n%s", err, out, itest.Tail(stderr.String(), 30), nc.containerLog(rabbitNS, gw.Name, "gateway"))
	}
	t.Logf("k8s: the openai client's two chats took %s", time.Since(began).Round(100*time.Millisecond))

	type usage struct {
		Prompt     int `json:"prompt_tokens"`
		Completion int `json:"completion_tokens"`
		Total      int `json:"total_tokens"`
	}
	type line struct {
		Name    string   `json:"name"`
		Error   string   `json:"error"`
		Message string   `json:"message"`
		ID      string   `json:"id"`
		Object  string   `json:"object"`
		Objects []string `json:"objects"`
		Model   string   `json:"model"`
		Choices int      `json:"choices"`
		Chunks  int      `json:"chunks"`
		Role    string   `json:"role"`
		Content string   `json:"content"`
		Finish  string   `json:"finish"`
		Usage   *usage   `json:"usage"`
	}
	got := map[string]line{}
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		var r line
		if err := json.Unmarshal([]byte(l), &r); err != nil {
			t.Fatalf("client output %q: %v", l, err)
		}
		got[r.Name] = r
		t.Logf("k8s: openai client: %s", l)
	}
	wantUsage := usage{standInPromptTokens, standInOutputTokens, standInPromptTokens + standInOutputTokens}
	chat, ok := got["chat"]
	switch {
	case !ok:
		t.Errorf("chat: no result")
	case chat.Error != "":
		t.Errorf("chat: %s: %s", chat.Error, chat.Message)
	case chat.Object != "chat.completion" || chat.ID == "" || chat.Choices != 1 || chat.Role != "assistant" || chat.Finish != "stop" ||
		chat.Content != standInChat || chat.Usage == nil || *chat.Usage != wantUsage:
		t.Errorf("chat: %+v (usage %+v); want a chat.completion with one assistant choice %q, finish stop, usage %+v", chat, chat.Usage, standInChat, wantUsage)
	}
	stream, ok := got["chat_stream"]
	switch {
	case !ok:
		t.Errorf("chat_stream: no result")
	case stream.Error != "":
		t.Errorf("chat_stream: %s: %s", stream.Error, stream.Message)
	case len(stream.Objects) != 1 || stream.Objects[0] != "chat.completion.chunk" || stream.ID == "" || stream.Chunks < 2 || stream.Role != "assistant" ||
		stream.Finish != "stop" || stream.Content != standInChat || stream.Usage == nil || *stream.Usage != wantUsage:
		t.Errorf("chat_stream: %+v (usage %+v); want chat.completion.chunk chunks from an assistant joining to %q, finish stop, usage %+v", stream, stream.Usage, standInChat, wantUsage)
	}
	if n := engine.callsFor("chat"); n != 2 {
		t.Errorf("the engine got %d chats, want the 2 the client sent", n)
	}
}
