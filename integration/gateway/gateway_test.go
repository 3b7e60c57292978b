package gateway

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/sous-run/sous/integration/itest"
	"github.com/sous-run/sous/integration/ollamatest"
	"github.com/sous-run/sous/internal/wire"
)

const apiKey = "sk-sous-it-4f1c9b"

// keysFile writes a keys file holding apiKey's hash.
func keysFile(t *testing.T) string {
	t.Helper()
	sum := sha256.Sum256([]byte(apiKey))
	path := filepath.Join(t.TempDir(), "keys")
	if err := os.WriteFile(path, []byte("# integration test\nit "+hex.EncodeToString(sum[:])+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// proc is a running gateway binary.
type proc struct {
	*itest.Worker
	api string // http://host:port of the API
}

func startWorker(t *testing.T, queue string, env ...string) *itest.Worker {
	t.Helper()
	return itest.StartWorker(t, itest.WorkerOptions{
		Bin: filepath.Join(binDir, "worker"),
		Env: append([]string{
			"SOUS_AMQP_URL=" + brokerURL, "SOUS_QUEUE=" + queue, "SOUS_RESULTS_QUEUE=" + queue + ".results",
			"SOUS_ENGINE_URL=" + ollama.URL(), "SOUS_MODEL=" + ollamatest.ModelName,
			"SOUS_MODELS_ALLOWED=" + ollamatest.EndlessModelName, "SOUS_MAX_NUM_PREDICT=2000",
			"SOUS_LOG_FORMAT=text", "SOUS_WORKER_ID=it-" + queue, "SOUS_DRAIN_TIMEOUT=5s",
		}, env...),
	})
}

func startGateway(t *testing.T, queue string, env ...string) *proc {
	t.Helper()
	addr := itest.FreeAddr(t)
	w := itest.StartWorker(t, itest.WorkerOptions{
		Bin: filepath.Join(binDir, "gateway"),
		Env: append([]string{
			"SOUS_AMQP_URL=" + brokerURL, "SOUS_QUEUE=" + queue, "SOUS_GATEWAY_ADDR=" + addr,
			"SOUS_MODEL=" + ollamatest.ModelName, "SOUS_MODELS_ALLOWED=" + ollamatest.EndlessModelName,
			"SOUS_MAX_NUM_PREDICT=2000", "SOUS_GATEWAY_KEYS_FILE=" + keysFile(t),
			"SOUS_LOG_FORMAT=text", "SOUS_LOG_LEVEL=debug", "SOUS_GATEWAY_TIMEOUT=90s",
			// The batch tests give a store of their own; the others need none.
			"SOUS_GATEWAY_DATABASE_URL=off",
		}, env...),
	})
	return &proc{Worker: w, api: "http://" + addr}
}

// declareFull declares a quorum queue with x-max-length 1 that refuses
// publishes beyond it (overflow reject-publish: the broker nacks them), and
// fills it.
func declareFull(t *testing.T) string {
	t.Helper()
	q := queueName(t, "-full")
	conn, err := amqp.Dial(brokerURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ch.QueueDeclare(q, true, false, false, false, amqp.Table{
		"x-queue-type": "quorum", "x-max-length": int64(1), "x-overflow": "reject-publish",
	}); err != nil {
		t.Fatal(err)
	}
	if err := ch.Confirm(false); err != nil {
		t.Fatal(err)
	}
	// A quorum queue's limit is soft: RabbitMQ 3.10 confirms one message
	// past x-max-length before it nacks. Fill it until it refuses.
	for range 5 {
		conf, err := ch.PublishWithDeferredConfirm("", q, false, false, amqp.Publishing{Body: []byte(`{"prompt":"filler"}`), DeliveryMode: amqp.Persistent})
		if err != nil {
			t.Fatalf("fill %s: %v", q, err)
		}
		if !conf.Wait() {
			return q
		}
	}
	t.Fatalf("%s confirmed 5 publishes with x-max-length 1 and overflow reject-publish", q)
	return ""
}

// TestOpenAINodeClient: the official OpenAI Node client, through the
// gateway, the real RabbitMQ, the worker and the real Ollama.
func TestOpenAINodeClient(t *testing.T) {
	t.Parallel()
	q := queueName(t, "")
	startWorker(t, q)
	gw := startGateway(t, q)
	full := startGateway(t, declareFull(t))

	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "node", "client.mjs")
	cmd.Dir = "node"
	cmd.Env = append(os.Environ(), "BASE_URL="+gw.api+"/v1", "FULL_BASE_URL="+full.api+"/v1", "API_KEY="+apiKey,
		"MODEL="+ollamatest.ModelName, "ENDLESS_MODEL="+ollamatest.EndlessModelName)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("node client.mjs: %v\nstdout:\n%s\nstderr:\n%s", err, out, itest.Tail(stderr.String(), 30))
	}
	want := []string{"chat", "chat_stream", "completion", "embedding", "models", "unknown_model", "wrong_key", "missing_key", "queue_full", "abort_mid_stream"}
	got := map[string]map[string]any{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		var r map[string]any
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatalf("client output %q: %v", line, err)
		}
		got[r["name"].(string)] = r
	}
	for _, name := range want {
		r, ok := got[name]
		switch {
		case !ok:
			t.Errorf("%s: no result", name)
		case r["ok"] != true:
			t.Errorf("%s failed: %v", name, r)
		default:
			t.Logf("%s: %v", name, r)
		}
	}
	if t.Failed() {
		return
	}
	// Healthy after the abort: ready, and the abandoned stream's late
	// result is dropped rather than delivered to anyone.
	if code := gw.Get("/readyz"); code != http.StatusOK {
		t.Fatalf("/readyz %d after the client abort", code)
	}
	itest.WaitUntil(t, 2*time.Minute, "the abandoned stream's result to be dropped", func() bool {
		return strings.Contains(gw.Logs(), "reply for no waiting request dropped")
	})
	if !strings.Contains(gw.Logs(), "client went away") {
		t.Error("the gateway did not notice the client going away")
	}
	if strings.Contains(gw.Logs(), apiKey) {
		t.Error("the API key is in the gateway's log")
	}
	code, metrics := gw.GetBody("/metrics")
	for _, want := range []string{`sous_gateway_requests_total{`, `error_type="model_not_found"`, `error_type="client_closed"`, `http_response_status_code="401"`, "sous_gateway_late_replies_total", "sous_gateway_request_duration_seconds_bucket"} {
		if code != http.StatusOK || !strings.Contains(metrics, want) {
			t.Errorf("/metrics (%d) has no %s", code, want)
		}
	}
	if _, fm := full.GetBody("/metrics"); !strings.Contains(fm, `error_type="queue_full"`) {
		t.Error("the full queue's gateway counts no queue_full")
	}
	if strings.Contains(metrics, apiKey) || strings.Contains(metrics, `key="`) {
		t.Error("a key in /metrics")
	}
}

// TestPublishedRequest: what the gateway publishes is a persistent message
// with direct reply-to, the client's trace id in its traceparent and a
// deadline the worker honours.
func TestPublishedRequest(t *testing.T) {
	t.Parallel()
	q := queueName(t, "")
	conn, err := amqp.Dial(brokerURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ch.QueueDeclare(q, true, false, false, false, amqp.Table{"x-queue-type": "quorum"}); err != nil {
		t.Fatal(err)
	}
	gw := startGateway(t, q, "SOUS_GATEWAY_TIMEOUT=3s")
	const traceID = "4bf92f3577b34da6a3ce929d0e0e4736"
	status := make(chan int, 1)
	go func() {
		req, _ := http.NewRequest(http.MethodPost, gw.api+"/v1/completions", strings.NewReader(`{"prompt":"hi","max_tokens":4}`))
		req.Header.Set("Authorization", "Bearer "+apiKey)
		req.Header.Set("traceparent", "00-"+traceID+"-00f067aa0ba902b7-01")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			status <- 0
			return
		}
		resp.Body.Close()
		status <- resp.StatusCode
	}()
	var d amqp.Delivery
	itest.WaitUntil(t, 10*time.Second, "the request in the queue", func() bool {
		var ok bool
		d, ok, _ = ch.Get(q, true)
		return ok
	})
	tp, _ := d.Headers["traceparent"].(string)
	if d.DeliveryMode != amqp.Persistent || d.ReplyTo != "amq.rabbitmq.reply-to" && !strings.HasPrefix(d.ReplyTo, "amq.rabbitmq.reply-to.") ||
		d.CorrelationId == "" || !strings.HasPrefix(tp, "00-"+traceID+"-") || strings.Contains(tp, "00f067aa0ba902b7") {
		t.Fatalf("published: mode %d reply_to %q correlation %q traceparent %q", d.DeliveryMode, d.ReplyTo, d.CorrelationId, tp)
	}
	var r wire.Request
	if err := json.Unmarshal(d.Body, &r); err != nil || r.Deadline == nil || r.Prompt == nil || r.Options["num_predict"] != float64(4) {
		t.Fatalf("body %s: %v", d.Body, err)
	}
	if until := time.Until(*r.Deadline); until > 3*time.Second || until < 0 {
		t.Fatalf("deadline %s away, want within SOUS_GATEWAY_TIMEOUT=3s", until)
	}
	// Nobody answers: 504 once the timeout is up.
	if s := <-status; s != http.StatusGatewayTimeout {
		t.Fatalf("status %d, want 504", s)
	}
	// A worker that starts now skips the expired request.
	ch2, _ := conn.Channel()
	defer ch2.Close()
	if err := ch2.Publish("", q, false, false, amqp.Publishing{Body: d.Body, DeliveryMode: amqp.Persistent, MessageId: d.MessageId, CorrelationId: d.CorrelationId, ContentType: "application/json"}); err != nil {
		t.Fatal(err)
	}
	w := startWorker(t, q)
	itest.WaitUntil(t, 30*time.Second, "the worker to skip the expired request", func() bool {
		return strings.Contains(w.Logs(), wire.ReasonExpired)
	})
}

// TestDrainOnSIGTERM: a stream open at SIGTERM finishes, new connections
// are refused, and the gateway exits 0.
func TestDrainOnSIGTERM(t *testing.T) {
	t.Parallel()
	q := queueName(t, "")
	gw := startGateway(t, q, "SOUS_GATEWAY_KEEPALIVE=200ms", "SOUS_DRAIN_TIMEOUT=60s")
	// Declare the queue the way the worker will (it tolerates an existing one).
	startWorker(t, q).Kill()
	req, _ := http.NewRequest(http.MethodPost, gw.api+"/v1/chat/completions",
		strings.NewReader(`{"messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":8}`))
	req.Header.Set("Authorization", "Bearer "+apiKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	br := bufio.NewReader(resp.Body)
	if line, err := br.ReadString('\n'); err != nil || !strings.HasPrefix(line, ":") {
		t.Fatalf("first line %q, %v", line, err)
	}
	if err := gw.Cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	itest.WaitUntil(t, 10*time.Second, "the gateway to stop accepting", func() bool {
		c := http.Client{Timeout: time.Second}
		r, err := c.Get(gw.api + "/v1/models")
		if err == nil {
			r.Body.Close()
		}
		return err != nil
	})
	// The stream is still open: a worker now answers it.
	startWorker(t, q)
	rest, err := io.ReadAll(br)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(rest), `"object":"chat.completion.chunk"`) || !strings.HasSuffix(string(rest), "data: [DONE]\n\n") {
		t.Fatalf("stream after SIGTERM:\n%s", rest)
	}
	if code := gw.ExitCode(t, 30*time.Second); code != 0 {
		t.Fatalf("exit code %d, want 0", code)
	}
}

// selfSigned writes a certificate for 127.0.0.1 and its key, and returns
// their paths and a pool that trusts the certificate.
func selfSigned(t *testing.T) (certFile, keyFile string, pool *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "sous-gateway-test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	certFile, keyFile = filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600); err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool = x509.NewCertPool()
	pool.AddCert(cert)
	return certFile, keyFile, pool
}

// TestTLSAndKeyReload: with a certificate the gateway serves HTTPS only,
// and a changed keys file takes effect without a restart.
func TestTLSAndKeyReload(t *testing.T) {
	t.Parallel()
	q := queueName(t, "")
	certFile, keyFile, pool := selfSigned(t)
	keys := keysFile(t)
	gw := startGateway(t, q, "SOUS_GATEWAY_TLS_CERT_FILE="+certFile, "SOUS_GATEWAY_TLS_KEY_FILE="+keyFile,
		"SOUS_GATEWAY_KEYS_FILE="+keys, "SOUS_GATEWAY_KEYS_RELOAD=100ms")
	api := strings.Replace(gw.api, "http://", "https://", 1)
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	get := func(c *http.Client, base, key string) int {
		req, _ := http.NewRequest(http.MethodGet, base+"/v1/models", nil)
		req.Header.Set("Authorization", "Bearer "+key)
		resp, err := c.Do(req)
		if err != nil {
			return 0
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if code := get(client, api, apiKey); code != http.StatusOK {
		t.Fatalf("HTTPS: %d", code)
	}
	if code := get(http.DefaultClient, gw.api, apiKey); code == http.StatusOK {
		t.Fatal("plain HTTP was served with a certificate configured")
	}
	const newKey = "sk-rotated-77"
	sum := sha256.Sum256([]byte(newKey))
	if err := os.WriteFile(keys, []byte("rotated "+hex.EncodeToString(sum[:])+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	itest.WaitUntil(t, 10*time.Second, "the rotated key to be accepted", func() bool { return get(client, api, newKey) == http.StatusOK })
	if code := get(client, api, apiKey); code != http.StatusUnauthorized {
		t.Fatalf("the revoked key: %d, want 401", code)
	}
	if strings.Contains(gw.Logs(), newKey) || strings.Contains(gw.Logs(), apiKey) {
		t.Fatal("a key is in the gateway's log")
	}
}

// TestGatewayDeclaresQueue: on a broker where no worker has run, the
// gateway declares the request queue and its dead-letter queue with the
// worker's arguments (SOUS_DECLARE=true, the default), so that a request
// sent before any worker exists waits in the queue (where KEDA counts it)
// and a worker started afterwards, declaring the same queues, starts
// without a word about other arguments and answers it. With
// SOUS_DECLARE=false the gateway declares nothing and its 503 says why.
func TestGatewayDeclaresQueue(t *testing.T) {
	t.Parallel()
	conn, err := amqp.Dial(brokerURL)
	if err != nil {
		t.Fatal(err)
	}
	// Not defer: the parallel subtests run after this function returns.
	t.Cleanup(func() { conn.Close() })
	// exists reports whether q exists; a passive declare of a missing
	// queue closes its channel, so each check has one of its own.
	exists := func(t *testing.T, q string) bool {
		t.Helper()
		ch, err := conn.Channel()
		if err != nil {
			t.Fatal(err)
		}
		defer ch.Close()
		_, err = ch.QueueDeclarePassive(q, true, false, false, false, nil)
		var aerr *amqp.Error
		if errors.As(err, &aerr) && aerr.Code == amqp.NotFound {
			return false
		}
		if err != nil {
			t.Fatalf("check %s: %v", q, err)
		}
		return true
	}

	t.Run("declare", func(t *testing.T) {
		t.Parallel()
		q := queueName(t, "")
		if exists(t, q) || exists(t, q+".dlq") {
			t.Fatalf("%s exists before the gateway starts", q)
		}
		gw := startGateway(t, q, "SOUS_MAX_ATTEMPTS=3")
		if !exists(t, q) || !exists(t, q+".dlq") {
			t.Fatalf("the gateway started but %s or %s.dlq does not exist", q, q)
		}
		// The worker's arguments, spelled out: a declare with any other
		// would be refused with PRECONDITION_FAILED.
		ch, err := conn.Channel()
		if err != nil {
			t.Fatal(err)
		}
		defer ch.Close()
		if _, err := ch.QueueDeclare(q, true, false, false, false, amqp.Table{
			"x-queue-type": "quorum", "x-dead-letter-exchange": "", "x-dead-letter-routing-key": q + ".dlq", "x-delivery-limit": int64(3),
		}); err != nil {
			t.Fatalf("declare %s with the worker's arguments: %v", q, err)
		}
		if _, err := ch.QueueDeclare(q+".dlq", true, false, false, false, amqp.Table{"x-queue-type": "quorum"}); err != nil {
			t.Fatalf("declare %s.dlq with the worker's arguments: %v", q, err)
		}

		status := make(chan int, 1)
		go func() {
			req, _ := http.NewRequest(http.MethodPost, gw.api+"/v1/completions", strings.NewReader(`{"prompt":"hi","max_tokens":4}`))
			req.Header.Set("Authorization", "Bearer "+apiKey)
			resp, err := (&http.Client{Timeout: 2 * time.Minute}).Do(req)
			if err != nil {
				status <- 0
				return
			}
			resp.Body.Close()
			status <- resp.StatusCode
		}()
		itest.WaitUntil(t, 30*time.Second, "the request in the queue", func() bool { return itest.QueueDepth(t, conn, q) == 1 })
		w := startWorker(t, q, "SOUS_MAX_ATTEMPTS=3")
		if s := <-status; s != http.StatusOK {
			t.Fatalf("status %d, want 200 from the worker started after the request", s)
		}
		for _, p := range []*itest.Worker{w, gw.Worker} {
			if strings.Contains(p.Logs(), "other arguments") {
				t.Errorf("pid %d found a queue with other arguments:\n%s", p.Pid(), itest.Tail(p.Logs(), 20))
			}
		}
	})

	t.Run("no declare", func(t *testing.T) {
		t.Parallel()
		q := queueName(t, "")
		gw := startGateway(t, q, "SOUS_DECLARE=false")
		if exists(t, q) || exists(t, q+".dlq") {
			t.Fatalf("the gateway declared %s with SOUS_DECLARE=false", q)
		}
		if !strings.Contains(gw.Logs(), "SOUS_DECLARE=false: the gateway does not declare the request queue") {
			t.Errorf("the gateway's log does not say it will not declare:\n%s", itest.Tail(gw.Logs(), 20))
		}
		req, _ := http.NewRequest(http.MethodPost, gw.api+"/v1/completions", strings.NewReader(`{"prompt":"hi","max_tokens":4}`))
		req.Header.Set("Authorization", "Bearer "+apiKey)
		resp, err := (&http.Client{Timeout: 2 * time.Minute}).Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(string(body), "does not exist") || !strings.Contains(string(body), "SOUS_DECLARE") {
			t.Fatalf("status %d %s, want 503 saying the queue does not exist and naming SOUS_DECLARE", resp.StatusCode, body)
		}
		if exists(t, q) {
			t.Fatalf("%s exists after a request with SOUS_DECLARE=false", q)
		}
	})
}
