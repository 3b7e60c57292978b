package main

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"os/exec"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"
)

func TestLoadConfigDefaults(t *testing.T) {
	t.Parallel()
	c, err := loadConfig([]string{"SOUS_MODEL=llama3.2", "SOUS_MODELS_ALLOWED=qwen2.5, llama3.2"})
	if err != nil {
		t.Fatal(err)
	}
	if c.Addr != ":8081" || c.Timeout != 5*time.Minute || c.KeepAlive != 15*time.Second || c.Queue != "sous.requests" ||
		c.HTTPAddr != ":8082" || c.Channels != 4 || c.MaxBodyBytes != 1<<20 || c.KeysFile != "" || c.DrainTimeout != 25*time.Second {
		t.Fatalf("defaults: %+v", c)
	}
	if got := allowedModels(c); strings.Join(got, "|") != "llama3.2|qwen2.5" {
		t.Fatalf("allowed %q", got)
	}
}

func TestInvalidConfigNamesTheVariable(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		env  []string
		name string
	}{
		{nil, "SOUS_MODEL"},
		{[]string{"SOUS_BROKER=kafka"}, "SOUS_BROKER"},
		{[]string{"SOUS_BROKER=servicebus"}, "SOUS_SERVICEBUS_CONNECTION_STRING"},
		{[]string{"SOUS_BROKER=servicebus", "SOUS_SERVICEBUS_CONNECTION_STRING=sb://x"}, "SOUS_SERVICEBUS_CONNECTION_STRING"},
		{[]string{"SOUS_BROKER=servicebus", "SOUS_SERVICEBUS_NAMESPACE=sb://ns"}, "SOUS_SERVICEBUS_NAMESPACE"},
		{[]string{"SOUS_BROKER=servicebus", "SOUS_SERVICEBUS_NAMESPACE=ns.servicebus.windows.net", "SOUS_GATEWAY_REPLY_QUEUE=sous.requests"}, "SOUS_GATEWAY_REPLY_QUEUE"},
		{[]string{"SOUS_BROKER=servicebus", "SOUS_SERVICEBUS_CONNECTION_STRING_FILE=/nonexistent/secret"}, "SOUS_SERVICEBUS_CONNECTION_STRING_FILE"},
		{[]string{"SOUS_AMQP_URL=http://x"}, "SOUS_AMQP_URL"},
		{[]string{"SOUS_GATEWAY_ADDR=8081"}, "SOUS_GATEWAY_ADDR"},
		{[]string{"SOUS_GATEWAY_TIMEOUT=soon"}, "SOUS_GATEWAY_TIMEOUT"},
		{[]string{"SOUS_GATEWAY_TIMEOUT=0s"}, "SOUS_GATEWAY_TIMEOUT"},
		{[]string{"SOUS_GATEWAY_KEEPALIVE=-1s"}, "SOUS_GATEWAY_KEEPALIVE"},
		{[]string{"SOUS_GATEWAY_RATE=-1"}, "SOUS_GATEWAY_RATE"},
		{[]string{"SOUS_GATEWAY_RATE=5"}, "SOUS_GATEWAY_KEYS_FILE"},
		{[]string{"SOUS_GATEWAY_CHANNELS=100"}, "SOUS_GATEWAY_CHANNELS"},
		{[]string{"SOUS_GATEWAY_TLS_CERT_FILE=/x"}, "SOUS_GATEWAY_TLS_CERT_FILE"},
		{[]string{"SOUS_GATEWAY_TLS_CERT_FILE=/nonexistent", "SOUS_GATEWAY_TLS_KEY_FILE=/nonexistent"}, "SOUS_GATEWAY_TLS_CERT_FILE"},
		{[]string{"SOUS_MODELS_ALLOWED=a,,b"}, "SOUS_MODELS_ALLOWED"},
		{[]string{"SOUS_MAX_BODY_BYTES=0"}, "SOUS_MAX_BODY_BYTES"},
		{[]string{"SOUS_LOG_LEVEL=loud"}, "SOUS_LOG_LEVEL"},
		{[]string{"OTEL_EXPORTER_OTLP_PROTOCOL=carrier-pigeon"}, "OTEL_EXPORTER_OTLP_PROTOCOL"},
		{[]string{"SOUS_AMQP_URL_FILE=/nonexistent/secret"}, "SOUS_AMQP_URL_FILE"},
		{[]string{"SOUS_GATEWAY_HEADER_TIMEOUT=0s"}, "SOUS_GATEWAY_HEADER_TIMEOUT"},
		{[]string{"SOUS_GATEWAY_DATABASE_URL=mysql://x"}, "SOUS_GATEWAY_DATABASE_URL"},
		{[]string{"SOUS_GATEWAY_BATCH_LANE=bulk"}, "SOUS_GATEWAY_BATCH_LANE"},
		{[]string{"SOUS_GATEWAY_LANES=interactive=a,bulk=b", "SOUS_GATEWAY_BATCH_LANE=night"}, "SOUS_GATEWAY_BATCH_LANE"},
		{[]string{"SOUS_GATEWAY_BATCH_RESULTS_QUEUE=sous.requests"}, "SOUS_GATEWAY_BATCH_RESULTS_QUEUE"},
		{[]string{"SOUS_GATEWAY_BATCH_OUTSTANDING=0"}, "SOUS_GATEWAY_BATCH_OUTSTANDING"},
		{[]string{"SOUS_GATEWAY_MAX_FILE_BYTES=-1"}, "SOUS_GATEWAY_MAX_FILE_BYTES"},
		{[]string{"SOUS_GATEWAY_UPLOAD_TIMEOUT=0s"}, "SOUS_GATEWAY_UPLOAD_TIMEOUT"},
		{[]string{"SOUS_GATEWAY_BODY_TIMEOUT=-1s"}, "SOUS_GATEWAY_BODY_TIMEOUT"},
		{[]string{"SOUS_GATEWAY_IDLE_TIMEOUT=later"}, "SOUS_GATEWAY_IDLE_TIMEOUT"},
		{[]string{"SOUS_GATEWAY_WRITE_TIMEOUT=10s"}, "SOUS_GATEWAY_WRITE_TIMEOUT"}, // not longer than the 15s keep-alive
		{[]string{"SOUS_GATEWAY_MAX_CONNS=0"}, "SOUS_GATEWAY_MAX_CONNS"},
		{[]string{"SOUS_GATEWAY_MAX_INTAKE=64", "SOUS_GATEWAY_MAX_OPEN=32"}, "SOUS_GATEWAY_MAX_INTAKE"},
		{[]string{"SOUS_GATEWAY_MAX_HEADER_BYTES=100"}, "SOUS_GATEWAY_MAX_HEADER_BYTES"},
		{[]string{"SOUS_GATEWAY_LANES=interactive=q.i,bulk=q.b:share=lots"}, "SOUS_GATEWAY_LANES"},
		{[]string{"SOUS_GATEWAY_LANES=interactive=q.i,bulk=q.i"}, "SOUS_GATEWAY_LANES"},
		{[]string{"SOUS_GATEWAY_LANES=interactive=q.i,bulk"}, "SOUS_GATEWAY_LANES"},
		{[]string{"SOUS_GATEWAY_LANES=inter active=q.i"}, "SOUS_GATEWAY_LANES"},
		{[]string{"SOUS_GATEWAY_LANES=a=q,b=q.dlq"}, "SOUS_GATEWAY_LANES"},                               // a's dead-letter queue is b's queue
		{[]string{"SOUS_DEAD_LETTER_QUEUE=dead", "SOUS_GATEWAY_LANES=a=q,b=dead"}, "SOUS_GATEWAY_LANES"}, // every lane's dead-letter queue
		{[]string{"SOUS_GATEWAY_LANES=a=" + strings.Repeat("q", 256)}, "SOUS_GATEWAY_LANES"},             // too long a queue name
		{[]string{"SOUS_GATEWAY_LANES=a=" + strings.Repeat("q", 252)}, "SOUS_GATEWAY_LANES"},             // too long a dead-letter queue name
		{[]string{"SOUS_BROKER=servicebus", "SOUS_SERVICEBUS_NAMESPACE=ns.servicebus.windows.net", "SOUS_GATEWAY_LANES=a=q,b=sous.replies"}, "SOUS_GATEWAY_LANES"},
	} {
		env := tt.env
		if tt.name != "SOUS_MODEL" {
			env = append([]string{"SOUS_MODEL=m"}, env...)
		}
		_, err := loadConfig(env)
		if err == nil || !strings.Contains(err.Error(), tt.name) {
			t.Errorf("%v: error %v does not name %s", tt.env, err, tt.name)
		}
	}
}

// SOUS_GATEWAY_LANES is read as SOUS_LANES (shares included, though the
// gateway does not use them), each lane's dead-letter queue as the
// worker's: SOUS_DEAD_LETTER_QUEUE when set, else <queue>.dlq. Unset: no
// lanes, SOUS_QUEUE alone.
func TestLanesConfig(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		env   []string
		names string
		dlqs  string
	}{
		{nil, "", ""},
		{[]string{"SOUS_GATEWAY_LANES= "}, "", ""},
		{[]string{"SOUS_GATEWAY_LANES=interactive=sous.interactive,bulk=sous.bulk:share=0.2"}, "interactive,bulk", "sous.interactive.dlq,sous.bulk.dlq"},
		{[]string{"SOUS_GATEWAY_LANES=interactive=sous.interactive,bulk=sous.bulk", "SOUS_DEAD_LETTER_QUEUE=sous.dead"}, "interactive,bulk", "sous.dead,sous.dead"},
		{[]string{"SOUS_BROKER=servicebus", "SOUS_SERVICEBUS_NAMESPACE=ns.servicebus.windows.net", "SOUS_GATEWAY_LANES=interactive=i,bulk=b"}, "interactive,bulk", ""},
	} {
		c, err := loadConfig(append([]string{"SOUS_MODEL=m"}, tc.env...))
		if err != nil {
			t.Fatalf("%v: %v", tc.env, err)
		}
		if got := strings.Join(c.laneNames(), ","); got != tc.names {
			t.Errorf("%v: lanes %q, want %q", tc.env, got, tc.names)
		}
		var dlqs []string
		for _, q := range amqpLanes(c) {
			dlqs = append(dlqs, q.DeadLetterQueue)
		}
		if c.Broker == "servicebus" {
			if got := strings.Join(laneQueues(c), ","); got != "i,b" {
				t.Errorf("%v: Service Bus lane queues %q", tc.env, got)
			}
			continue
		}
		if got := strings.Join(dlqs, ","); got != tc.dlqs {
			t.Errorf("%v: dead-letter queues %q, want %q", tc.env, got, tc.dlqs)
		}
	}
}

// Service Bus: the connection string may come from a file; the AMQP URL is
// not checked.
func TestServiceBusConfig(t *testing.T) {
	t.Parallel()
	path := t.TempDir() + "/cs"
	if err := os.WriteFile(path, []byte("Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := loadConfig([]string{"SOUS_MODEL=m", "SOUS_BROKER=servicebus", "SOUS_SERVICEBUS_CONNECTION_STRING_FILE=" + path, "SOUS_AMQP_URL=not-a-url"})
	if err != nil {
		t.Fatal(err)
	}
	if c.ReplyQueue != "sous.replies" || !strings.HasSuffix(c.ServiceBusConnectionString.Reveal(), "SharedAccessKey=s3cret") {
		t.Fatalf("reply queue %q, connection string read: %v", c.ReplyQueue, strings.HasSuffix(c.ServiceBusConnectionString.Reveal(), "s3cret"))
	}
}

// A bad URL never reaches the error text: it may hold a password.
func TestConfigErrorsHideTheURL(t *testing.T) {
	t.Parallel()
	_, err := loadConfig([]string{"SOUS_MODEL=m", "SOUS_AMQP_URL=http://u:hunter2@x/"})
	if err == nil || strings.Contains(err.Error(), "hunter2") {
		t.Fatalf("%v", err)
	}
}

// TestEveryVariableIsInTheReadme keeps the README's tables complete.
func TestEveryVariableIsInTheReadme(t *testing.T) {
	t.Parallel()
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	rows := map[string]bool{}
	for _, m := range regexp.MustCompile("(?m)^\\| `([A-Z_]+)` \\|").FindAllStringSubmatch(string(readme), -1) {
		rows[m[1]] = true
	}
	ty := reflect.TypeFor[Config]()
	for i := range ty.NumField() {
		if name := strings.Split(ty.Field(i).Tag.Get("env"), ",")[0]; name != "" && !rows[name] {
			t.Errorf("%s is not in README.md's configuration tables", name)
		}
	}
}

// The binary exits 2 on a bad configuration, naming the variable.
func TestExitTwoOnBadConfig(t *testing.T) {
	t.Parallel()
	if os.Getenv("SOUS_GATEWAY_TEST_MAIN") == "1" {
		main()
		return
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestExitTwoOnBadConfig$")
	cmd.Env = append(os.Environ(), "SOUS_GATEWAY_TEST_MAIN=1", "SOUS_MODEL=m", "SOUS_GATEWAY_TIMEOUT=forever")
	out, err := cmd.CombinedOutput()
	ee, ok := err.(*exec.ExitError)
	if !ok || ee.ExitCode() != 2 || !strings.Contains(string(out), "SOUS_GATEWAY_TIMEOUT") {
		t.Fatalf("exit %v, output %s", err, out)
	}
}

// An invalid SOUS_GATEWAY_LANES stops the binary with exit 2, naming it
// and what is wrong.
func TestExitTwoOnBadLanes(t *testing.T) {
	t.Parallel()
	cmd := exec.Command(os.Args[0], "-test.run=^TestExitTwoOnBadConfig$")
	cmd.Env = append(os.Environ(), "SOUS_GATEWAY_TEST_MAIN=1", "SOUS_MODEL=m", "SOUS_GATEWAY_LANES=interactive=q.i,bulk=q.b:weight=2")
	out, err := cmd.CombinedOutput()
	ee, ok := err.(*exec.ExitError)
	if !ok || ee.ExitCode() != 2 || !strings.Contains(string(out), "SOUS_GATEWAY_LANES") || !strings.Contains(string(out), `unknown option "weight=2"`) {
		t.Fatalf("exit %v, output %s", err, out)
	}
}

// A keys file whose lanes= names a lane SOUS_GATEWAY_LANES lacks, or has
// lanes= on a gateway without lanes, stops the gateway at start (exit 2),
// before it connects to the broker.
func TestKeysFileLanesChecked(t *testing.T) {
	t.Parallel()
	path := t.TempDir() + "/keys"
	if err := os.WriteFile(path, []byte("alice "+strings.Repeat("ab", 32)+" lanes=bulk\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, spec := range []string{"", "interactive=q.i,batch=q.b"} {
		cfg, err := loadConfig([]string{"SOUS_MODEL=m", "SOUS_GATEWAY_KEYS_FILE=" + path, "SOUS_GATEWAY_LANES=" + spec,
			"SOUS_AMQP_URL=amqp://guest:guest@127.0.0.1:9/", "SOUS_HTTP_ADDR=off", "OTEL_SDK_DISABLED=true"})
		if err != nil {
			t.Fatal(err)
		}
		err = run(context.Background(), cfg, slog.New(slog.DiscardHandler))
		var ce *configError
		if !errors.As(err, &ce) || ce.Var != "SOUS_GATEWAY_KEYS_FILE" || !strings.Contains(err.Error(), "lanes=") {
			t.Errorf("lanes %q: run = %v, want a configError naming SOUS_GATEWAY_KEYS_FILE and lanes=", spec, err)
		}
	}
}

// Metrics go where the worker's go for the same variables.
func TestMetricReaders(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		env        []string
		prom, otlp bool
	}{
		{nil, true, false},
		{[]string{"OTEL_EXPORTER_OTLP_ENDPOINT=http://c:4318"}, true, true},
		{[]string{"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT=http://c:4318/v1/metrics"}, true, true},
		{[]string{"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=http://c:4318/v1/traces"}, true, false},
		{[]string{"OTEL_METRICS_EXPORTER=otlp"}, false, true},
		{[]string{"OTEL_METRICS_EXPORTER=prometheus, otlp"}, true, true},
		{[]string{"OTEL_METRICS_EXPORTER=none", "OTEL_EXPORTER_OTLP_ENDPOINT=http://c:4318"}, false, false},
		{[]string{"SOUS_HTTP_ADDR=off", "OTEL_EXPORTER_OTLP_ENDPOINT=http://c:4318"}, false, true},
		{[]string{"OTEL_SDK_DISABLED=true", "OTEL_EXPORTER_OTLP_ENDPOINT=http://c:4318"}, false, false},
	} {
		c, err := loadConfig(append([]string{"SOUS_MODEL=m"}, tt.env...))
		if err != nil {
			t.Fatal(err)
		}
		if prom, otlp := c.metricReaders(); prom != tt.prom || otlp != tt.otlp {
			t.Errorf("%v: prometheus %v otlp %v, want %v %v", tt.env, prom, otlp, tt.prom, tt.otlp)
		}
	}
	for _, bad := range []string{"OTEL_METRICS_EXPORTER=statsd", "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL=http/json"} {
		name, _, _ := strings.Cut(bad, "=")
		if _, err := loadConfig([]string{"SOUS_MODEL=m", bad}); err == nil || !strings.Contains(err.Error(), name) {
			t.Errorf("%s: %v", bad, err)
		}
	}
}

// The README's quick start runs a worker and a gateway on one machine with
// no settings: no two of their default listen addresses may be the same.
// The worker's default is read from its source (a main package cannot be
// imported).
func TestDefaultsRunBesideTheWorker(t *testing.T) {
	t.Parallel()
	src, err := os.ReadFile("../worker/config.go")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`env:"SOUS_HTTP_ADDR" envDefault:"([^"]*)"`).FindSubmatch(src)
	if m == nil {
		t.Fatal("no SOUS_HTTP_ADDR default in cmd/worker/config.go")
	}
	c, err := loadConfig([]string{"SOUS_MODEL=m"})
	if err != nil {
		t.Fatal(err)
	}
	addrs := map[string]string{}
	for _, a := range []struct{ what, addr string }{{"worker SOUS_HTTP_ADDR", string(m[1])}, {"gateway SOUS_GATEWAY_ADDR", c.Addr}, {"gateway SOUS_HTTP_ADDR", c.HTTPAddr}} {
		if other, ok := addrs[a.addr]; ok {
			t.Errorf("%s and %s both default to %s: they cannot run side by side", other, a.what, a.addr)
		}
		addrs[a.addr] = a.what
	}
}

func TestBatchConfig(t *testing.T) {
	t.Parallel()
	c, err := loadConfig([]string{"SOUS_MODEL=m"})
	if err != nil {
		t.Fatal(err)
	}
	if !c.batchOn() || c.databaseSet || c.batchLane().Queue != "sous.requests" || c.BatchOutstanding != 1000 || c.MaxFileBytes != 200<<20 {
		t.Fatalf("defaults: on %v set %v lane %+v %+v", c.batchOn(), c.databaseSet, c.batchLane(), c)
	}
	c, err = loadConfig([]string{"SOUS_MODEL=m", "SOUS_GATEWAY_LANES=interactive=a,bulk=b,night=c", "SOUS_GATEWAY_DATABASE_URL=postgres://u:p@h/db"})
	if err != nil {
		t.Fatal(err)
	}
	if !c.databaseSet || c.batchLane().Name != "night" {
		t.Fatalf("the last lane takes batches: %+v", c.batchLane())
	}
	c, _ = loadConfig([]string{"SOUS_MODEL=m", "SOUS_GATEWAY_LANES=interactive=a,bulk=b,night=c", "SOUS_GATEWAY_BATCH_LANE=bulk"})
	if c.batchLane().Queue != "b" {
		t.Fatalf("SOUS_GATEWAY_BATCH_LANE: %+v", c.batchLane())
	}
	c, _ = loadConfig([]string{"SOUS_MODEL=m", "SOUS_GATEWAY_DATABASE_URL=off"})
	if c.batchOn() {
		t.Fatal("off is on")
	}
	c, _ = loadConfig([]string{"SOUS_MODEL=m", "SOUS_BROKER=servicebus", "SOUS_SERVICEBUS_NAMESPACE=ns.servicebus.windows.net"})
	if c.batchOn() {
		t.Fatal("the Batch API on Service Bus")
	}
	// The password of a PostgreSQL URL never reaches an error.
	_, err = loadConfig([]string{"SOUS_MODEL=m", "SOUS_GATEWAY_DATABASE_URL=mysql://u:hunter2@h/db"})
	if err == nil || strings.Contains(err.Error(), "hunter2") {
		t.Fatalf("%v", err)
	}
}
