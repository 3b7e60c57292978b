package reliability

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// canary is a random secret to plant and grep for.
func canary(what string) string {
	b := make([]byte, 12)
	_, _ = rand.Read(b)
	return what + "-" + hex.EncodeToString(b)
}

// TestTLS: the worker speaks amqps:// to a private node that listens with
// TLS only and requires client certificates, verifying the server against
// SOUS_AMQP_CA_FILE and presenting SOUS_AMQP_CERT_FILE/SOUS_AMQP_KEY_FILE.
// Every wrong setup fails the handshake (the worker keeps retrying and
// never becomes ready), and no error it logs holds the password.
func TestTLS(t *testing.T) {
	t.Parallel()
	p := newPKI(t)
	password := canary("tlspw")
	node := startNode(t, nodeOptions{tls: p, requireClientCert: true,
		conf: []string{"default_user = sous-app", "default_pass = " + password}})
	url := fmt.Sprintf("amqps://sous-app:%s@127.0.0.1:%d/", password, node.port)
	eng := newFakeEngine(t)

	t.Run("verified", func(t *testing.T) {
		q := names(t)
		w := startWorker(t, workerOpts{queue: q, brokerURL: url, engineURL: eng.URL(), env: []string{
			"SOUS_AMQP_CA_FILE=" + p.caFile, "SOUS_AMQP_CERT_FILE=" + p.clientCert, "SOUS_AMQP_KEY_FILE=" + p.clientKey}})
		l := newLedger()
		l.follow(t, url, q+".results", "results", p.clientTLS(t))
		c := newClientTLS(t, url, p.clientTLS(t))
		ids := c.publishRequests(q, "tls", 5)
		tl := l.waitSettled(t, ids, 30*time.Second)
		checkNoLoss(t, tl)
		if strings.Contains(w.Logs(), password) {
			t.Errorf("the password is in the worker's log")
		}
	})

	tests := []struct {
		name string
		url  string
		env  []string
		want []string // any of these in the log: the handshake error
	}{
		{name: "system_roots", url: url, env: []string{"SOUS_AMQP_CERT_FILE=" + p.clientCert, "SOUS_AMQP_KEY_FILE=" + p.clientKey},
			want: []string{"certificate signed by unknown authority"}},
		{name: "wrong_ca", url: url, env: []string{"SOUS_AMQP_CA_FILE=" + p.otherCAFile, "SOUS_AMQP_CERT_FILE=" + p.clientCert, "SOUS_AMQP_KEY_FILE=" + p.clientKey},
			want: []string{"certificate signed by unknown authority"}},
		// With TLS 1.3 the client learns that its missing certificate was
		// refused only at its first read; amqp091-go may then report the
		// connection as not open.
		{name: "no_client_cert", url: url, env: []string{"SOUS_AMQP_CA_FILE=" + p.caFile},
			want: []string{"certificate required", "handshake failure", "bad certificate", "EOF", "connection reset", "not open"}},
		{name: "client_cert_from_other_ca", url: url, env: []string{"SOUS_AMQP_CA_FILE=" + p.caFile, "SOUS_AMQP_CERT_FILE=" + p.otherCert, "SOUS_AMQP_KEY_FILE=" + p.otherKey},
			// Go sends no certificate at all when the server's list of
			// acceptable CAs does not name its issuer.
			want: []string{"certificate required", "unknown certificate authority", "unknown ca", "bad certificate", "connection reset", "not open"}},
		// The server certificate names 127.0.0.1 only.
		{name: "hostname_mismatch", url: strings.Replace(url, "127.0.0.1", "localhost", 1), env: []string{"SOUS_AMQP_CA_FILE=" + p.caFile, "SOUS_AMQP_CERT_FILE=" + p.clientCert, "SOUS_AMQP_KEY_FILE=" + p.clientKey},
			want: []string{"certificate is valid for 127.0.0.1, not localhost", "not valid for any names, but wanted to match localhost"}},
		{name: "plaintext_to_tls_port", url: strings.Replace(url, "amqps://", "amqp://", 1), env: nil,
			want: []string{"broker connect failed"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			q := names(t)
			w := startWorker(t, workerOpts{queue: q, brokerURL: tt.url, engineURL: eng.URL(), probe: "none", env: tt.env})
			waitUntil(t, 30*time.Second, "a failed connect in the log", func() bool {
				return strings.Contains(w.Logs(), "broker connect failed")
			})
			// The worker retries; an operator reads the reason in its log. An
			// attempt can lose it (amqp091-go's writer can see the socket
			// its reader closed on the TLS alert, and reports "use of closed
			// network connection"), so the reason must show within a few
			// attempts, not on the first.
			says := func(logs string) bool {
				for _, s := range tt.want {
					if strings.Contains(logs, s) {
						return true
					}
				}
				return false
			}
			deadline := time.Now().Add(30 * time.Second)
			for !says(w.Logs()) && time.Now().Before(deadline) {
				time.Sleep(100 * time.Millisecond)
			}
			logs := w.Logs()
			if !says(logs) {
				t.Errorf("log does not say why the handshake failed (want one of %q):\n%s", tt.want, tail(logs, 10))
			}
			if w.Get("/readyz") == 200 {
				t.Errorf("ready although the TLS setup is wrong")
			}
			if strings.Contains(logs, password) {
				t.Errorf("the password is in the worker's log")
			}
			line := ""
			for l := range strings.Lines(logs) {
				if strings.Contains(l, "broker connect failed") {
					line = l
					break
				}
			}
			figure(t, "error", strings.TrimSpace(line))
		})
	}
}

// otlpSink is an OTLP/HTTP collector that keeps every body it receives.
type otlpSink struct {
	srv    *httptest.Server
	mu     sync.Mutex
	bodies [][]byte
}

func newOTLPSink(t testing.TB) *otlpSink {
	s := &otlpSink{}
	s.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		s.mu.Lock()
		s.bodies = append(s.bodies, append([]byte(r.URL.Path+"\n"), b...))
		s.mu.Unlock()
		w.Header().Set("Content-Type", "application/x-protobuf")
		w.WriteHeader(http.StatusOK)
	}))
	t.Cleanup(s.srv.Close)
	return s
}

func (s *otlpSink) received(path string) (n, bytes int, all string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var b strings.Builder
	for _, body := range s.bodies {
		b.Write(body)
		if strings.HasPrefix(string(body), path+"\n") {
			n++
			bytes += len(body)
		}
	}
	return n, bytes, b.String()
}

// fakeOpenAI is an OpenAI-compatible engine that rejects every completion
// with an error that echoes the API key it was sent, as some gateways do.
func fakeOpenAI(t testing.TB) *httptest.Server {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet {
			_, _ = w.Write([]byte(`{"object":"list","data":[{"id":"tiny","object":"model"}]}`))
			return
		}
		key := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusBadRequest)
		_ = json.NewEncoder(w).Encode(map[string]any{"error": map[string]string{"message": "Incorrect API key provided: " + key, "type": "invalid_request_error"}})
	}))
	t.Cleanup(srv.Close)
	return srv
}

// TestSecretsNeverLeak plants secrets everywhere a worker takes one — the
// broker password (read from SOUS_AMQP_URL_FILE), a wrong broker password,
// a password in SOUS_ENGINE_URL, an engine API key from
// SOUS_ENGINE_API_KEY_FILE that the engine echoes back in its errors, a
// password in the OTLP endpoint and an OTLP header — then provokes every
// error path it can (bad input, engine down, broker stopped and restarted,
// authentication refused, engine rejecting the key) and greps what leaves
// the worker: its log at debug level, every result and dead letter (bodies
// and headers), /metrics, /readyz, and the traces it exports over OTLP.
func TestSecretsNeverLeak(t *testing.T) {
	t.Parallel()
	var (
		brokerPW  = canary("brokerpw")
		wrongPW   = canary("wrongpw")
		enginePW  = canary("enginepw")
		apiKey    = canary("sk")
		otlpPW    = canary("otlppw")
		otlpToken = canary("otlptoken")
		prompt    = canary("prompt")
	)
	secrets := map[string]string{"broker password": brokerPW, "wrong broker password": wrongPW, "engine URL password": enginePW,
		"engine API key": apiKey, "OTLP endpoint password": otlpPW, "OTLP header": otlpToken}
	node := startNode(t, nodeOptions{conf: []string{"default_user = sous-app", "default_pass = " + brokerPW}})
	url := fmt.Sprintf("amqp://sous-app:%s@127.0.0.1:%d/", brokerPW, node.port)
	dir := t.TempDir()
	writeSecret := func(name, v string) string {
		path := filepath.Join(dir, name)
		must(t, os.WriteFile(path, []byte(v+"\n"), 0o600))
		return path
	}
	sink := newOTLPSink(t)
	otlpEndpoint := strings.Replace(sink.srv.URL, "http://", "http://collector:"+otlpPW+"@", 1)
	telemetryEnv := []string{"OTEL_EXPORTER_OTLP_ENDPOINT=" + otlpEndpoint, "OTEL_EXPORTER_OTLP_HEADERS=authorization=Bearer " + otlpToken,
		"OTEL_BSP_SCHEDULE_DELAY=100", "OTEL_METRIC_EXPORT_INTERVAL=500", "OTEL_METRICS_EXPORTER=prometheus,otlp"}

	eng := newFakeEngine(t)
	engineURL := strings.Replace(eng.URL(), "http://", "http://ollama:"+enginePW+"@", 1)
	q := names(t)
	w := startWorker(t, workerOpts{queue: q, brokerURL: "amqp://unused:unused@127.0.0.1:1/", engineURL: engineURL, env: append([]string{
		"SOUS_AMQP_URL_FILE=" + writeSecret("amqp-url", url), "SOUS_MAX_ATTEMPTS=2", "SOUS_ENGINE_TIMEOUT=2s"}, telemetryEnv...)})
	l := newLedger()
	l.keepRaw = true
	l.follow(t, url, q+".results", "results", nil)
	l.follow(t, url, q+".dlq", "dead", nil)
	c := newClient(t, url)

	// A good request, a bad one, and requests while the engine fails.
	c.publish(q, msg{id: "good", body: `{"prompt":"` + prompt + `","options":{"num_predict":4}}`})
	c.publish(q, msg{id: "bad", body: `{"prompt":"` + prompt + `","evil":1}`})
	waitUntil(t, 30*time.Second, "good and bad settled", func() bool { return l.settled([]string{"good", "bad"}) == 2 })
	eng.status.Store(500)
	eng.errorMsg.Store("engine exploded")
	c.publish(q, msg{id: "engine-500", body: request("engine-500")})
	waitUntil(t, 30*time.Second, "engine-500 dead-lettered", func() bool { return l.settled([]string{"engine-500"}) == 1 })
	eng.status.Store(0)
	eng.close() // the engine is gone: connection refused, with its URL in the error
	c.publish(q, msg{id: "engine-down", body: request("engine-down")})
	waitUntil(t, 30*time.Second, "the engine's connection errors", func() bool { return strings.Count(w.Logs(), "connection refused") >= 2 })
	_, readyz := w.GetBody("/readyz")

	// The broker goes away and comes back: reconnect errors are logged.
	must(t, node.stop())
	waitUntil(t, 30*time.Second, "a failed reconnect", func() bool { return strings.Contains(w.Logs(), "broker connect failed") })
	_, readyzDown := w.GetBody("/readyz")
	_, err := node.start()
	must(t, err)
	w.WaitProbe(t, "/healthz", 30*time.Second)
	waitUntil(t, 60*time.Second, "the worker reconnected", func() bool { return strings.Contains(w.Logs(), "broker reconnected") })
	_, metrics := w.GetBody("/metrics")
	c = newClient(t, url) // the first one died with the node

	// A worker with the wrong password, and one whose engine echoes its key.
	bad := startWorker(t, workerOpts{queue: names(t), brokerURL: "amqp://unused:unused@127.0.0.1:1/", engineURL: eng.URL(), probe: "none", env: append([]string{
		"SOUS_AMQP_URL_FILE=" + writeSecret("wrong-url", strings.Replace(url, brokerPW, wrongPW, 1))}, telemetryEnv...)})
	// A refused password at start is configuration: the worker says so
	// naming SOUS_AMQP_URL and exits 2.
	waitUntil(t, 30*time.Second, "an authentication failure", func() bool {
		return strings.Contains(bad.Logs(), "broker connect failed") || strings.Contains(bad.Logs(), "SOUS_AMQP_URL")
	})
	oa := fakeOpenAI(t)
	q2 := names(t)
	keyed := startWorker(t, workerOpts{queue: q2, brokerURL: url, engineURL: oa.URL, env: append([]string{
		"SOUS_ENGINE=openai", "SOUS_ENGINE_API_KEY_FILE=" + writeSecret("api-key", apiKey)}, telemetryEnv...)})
	l.follow(t, url, q2+".results", "results", nil)
	l.follow(t, url, q2+".dlq", "dead", nil)
	c.publish(q2, msg{id: "key-echo", body: request("key-echo")})
	waitUntil(t, 30*time.Second, "key-echo dead-lettered", func() bool { return l.settled([]string{"key-echo"}) == 1 })
	_, metrics2 := keyed.GetBody("/metrics")
	time.Sleep(time.Second) // the last spans and metrics reach the sink

	// Everything that left the workers: logs, HTTP answers, every result
	// and dead letter with its headers and properties, and what OTLP got.
	var out strings.Builder
	for _, part := range []string{w.Logs(), bad.Logs(), keyed.Logs(), readyz, readyzDown, metrics, metrics2} {
		out.WriteString(part)
	}
	l.mu.Lock()
	figure(t, "results_and_dead_letters_checked", len(l.raw))
	for _, d := range l.raw {
		fmt.Fprintf(&out, "%v %s %s %s %s\n", d.Headers, d.MessageId, d.CorrelationId, d.ReplyTo, d.Body)
	}
	l.mu.Unlock()
	traces, traceBytes, otlp := sink.received("/v1/traces")
	metricExports, _, _ := sink.received("/v1/metrics")
	out.WriteString(otlp)
	figure(t, "otlp_trace_exports", fmt.Sprintf("%d (%d bytes)", traces, traceBytes))
	figure(t, "otlp_metric_exports", metricExports)
	if traces == 0 {
		t.Errorf("no trace reached the OTLP sink: the traces were not checked")
	}
	everything := out.String()
	for what, s := range secrets {
		if strings.Contains(everything, s) {
			i := strings.Index(everything, s)
			t.Errorf("LEAK: the %s appears in what the worker emits: ...%s...", what, everything[max(0, i-200):min(len(everything), i+len(s)+50)])
		}
	}
	for _, check := range []struct{ name, s string }{{"logs", w.Logs()}, {"metrics", metrics}, {"traces", otlp}} {
		figure(t, "prompt_in_"+check.name, strings.Contains(check.s, prompt))
	}
	if strings.Contains(metrics, prompt) {
		t.Errorf("a prompt appears in /metrics")
	}
	// What the errors said, for the record.
	for _, id := range []string{"engine-500", "key-echo"} {
		for _, d := range l.deadLetters(id) {
			figure(t, id+"_dead_letter_description", fmt.Sprintf("%q", d.Headers["x-sous-dead-letter-description"]))
		}
	}
}

// TestHTTPEndpoints: the worker's HTTP server shows probes and metrics, no
// request data, and no pprof unless SOUS_PPROF=true.
func TestHTTPEndpoints(t *testing.T) {
	t.Parallel()
	eng := newFakeEngine(t)
	prompt := canary("prompt")
	pprofPaths := []string{"/debug/pprof/", "/debug/pprof/goroutine?debug=1", "/debug/pprof/heap", "/debug/pprof/cmdline",
		"/debug/pprof/symbol", "/debug/pprof/profile?seconds=1", "/debug/pprof/trace?seconds=1"}
	for _, pprofOn := range []bool{false, true} {
		t.Run(fmt.Sprintf("pprof=%t", pprofOn), func(t *testing.T) {
			t.Parallel()
			q := names(t)
			w := startWorker(t, workerOpts{queue: q, engineURL: eng.URL(), env: []string{fmt.Sprintf("SOUS_PPROF=%t", pprofOn)}})
			l := newLedger()
			l.follow(t, sharedURL, q+".results", "results", nil)
			c := newClient(t, sharedURL)
			c.publish(q, msg{id: "p", body: `{"prompt":"` + prompt + `","options":{"num_predict":4}}`})
			waitUntil(t, 30*time.Second, "the request answered", func() bool { return l.resultCount("p") > 0 })
			for _, path := range []string{"/healthz", "/readyz", "/metrics"} {
				code, body := w.GetBody(path)
				if code != 200 {
					t.Errorf("GET %s = %d", path, code)
				}
				if strings.Contains(body, prompt) || strings.Contains(body, "guest:guest") {
					t.Errorf("GET %s exposes request data or credentials", path)
				}
			}
			for _, path := range []string{"/", "/debug/vars", "/env", "/config"} {
				if code := w.Get(path); code != 404 {
					t.Errorf("GET %s = %d, want 404", path, code)
				}
			}
			resp, err := httpClient.Post("http://"+w.Addr+"/healthz", "text/plain", nil)
			if err == nil {
				resp.Body.Close()
				if resp.StatusCode != http.StatusMethodNotAllowed {
					t.Errorf("POST /healthz = %d, want 405", resp.StatusCode)
				}
			}
			for _, path := range pprofPaths {
				code := w.Get(path)
				switch {
				case !pprofOn && code != 404:
					t.Errorf("SOUS_PPROF=false: GET %s = %d, want 404", path, code)
				case pprofOn && path == "/debug/pprof/cmdline" && code == 200:
					t.Errorf("SOUS_PPROF=true: GET %s = 200: the command line is not needed to profile", path)
				case pprofOn && path != "/debug/pprof/cmdline" && path != "/debug/pprof/symbol" && code != 200:
					t.Errorf("SOUS_PPROF=true: GET %s = %d, want 200", path, code)
				}
				figure(t, "GET "+path, code)
			}
		})
	}
}
