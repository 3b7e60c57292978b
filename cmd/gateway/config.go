package main

import (
	"crypto/tls"
	"fmt"
	"log/slog"
	"net"
	"reflect"
	"slices"
	"strings"
	"time"

	"github.com/sous-run/sous/internal/brokerconfig"
	"github.com/sous-run/sous/internal/envcheck"
	"github.com/sous-run/sous/internal/lanes"
	"github.com/sous-run/sous/internal/secret"
	"github.com/sous-run/sous/internal/telemetry"
)

// Config is everything the gateway reads from its environment. Each field
// names its variable and default; README.md lists them (a test checks).
type Config struct {
	// Addr is where the OpenAI-compatible API listens
	// (SOUS_GATEWAY_ADDR, default :8081).
	Addr string `env:"SOUS_GATEWAY_ADDR" envDefault:":8081"`
	// KeysFile holds the API keys, "<name> <hex sha256>" per line
	// (SOUS_GATEWAY_KEYS_FILE; unset: no authentication, with a warning).
	KeysFile string `env:"SOUS_GATEWAY_KEYS_FILE"`
	// KeysReload is how often the keys file is checked for changes
	// (SOUS_GATEWAY_KEYS_RELOAD, default 5s).
	KeysReload time.Duration `env:"SOUS_GATEWAY_KEYS_RELOAD" envDefault:"5s"`
	// Rate is each key's requests per second unless its line says rate=
	// (SOUS_GATEWAY_RATE, default 0: no limit).
	Rate float64 `env:"SOUS_GATEWAY_RATE" envDefault:"0"`
	// Timeout bounds the wait for an answer; requests carry now + Timeout
	// as their deadline (SOUS_GATEWAY_TIMEOUT, default 5m).
	Timeout time.Duration `env:"SOUS_GATEWAY_TIMEOUT" envDefault:"5m"`
	// KeepAlive is the interval of SSE comments on a waiting stream
	// (SOUS_GATEWAY_KEEPALIVE, default 15s).
	KeepAlive time.Duration `env:"SOUS_GATEWAY_KEEPALIVE" envDefault:"15s"`
	// RetryAfter is the Retry-After of a 429 for a full queue
	// (SOUS_GATEWAY_RETRY_AFTER, default 5s).
	RetryAfter time.Duration `env:"SOUS_GATEWAY_RETRY_AFTER" envDefault:"5s"`
	// MaxOpen bounds the requests held open at once
	// (SOUS_GATEWAY_MAX_OPEN, default 1024).
	MaxOpen int `env:"SOUS_GATEWAY_MAX_OPEN" envDefault:"1024"`
	// MaxIntake bounds the requests whose bodies are being read, decoded
	// and published at once, each holding its body several times over
	// (SOUS_GATEWAY_MAX_INTAKE, default 32).
	MaxIntake int `env:"SOUS_GATEWAY_MAX_INTAKE" envDefault:"32"`
	// MaxConns bounds the client connections held at once; more wait in
	// the listen backlog (SOUS_GATEWAY_MAX_CONNS, default 2048).
	MaxConns int `env:"SOUS_GATEWAY_MAX_CONNS" envDefault:"2048"`
	// HeaderTimeout bounds the reading of a request's headers
	// (SOUS_GATEWAY_HEADER_TIMEOUT, default 10s).
	HeaderTimeout time.Duration `env:"SOUS_GATEWAY_HEADER_TIMEOUT" envDefault:"10s"`
	// BodyTimeout bounds the reading of a request's body, from the end of
	// its headers; 408 after it (SOUS_GATEWAY_BODY_TIMEOUT, default 30s).
	BodyTimeout time.Duration `env:"SOUS_GATEWAY_BODY_TIMEOUT" envDefault:"30s"`
	// WriteTimeout bounds each write of a response (each event of a
	// stream), so that a client that stops reading frees its request
	// (SOUS_GATEWAY_WRITE_TIMEOUT, default 30s; more than
	// SOUS_GATEWAY_KEEPALIVE).
	WriteTimeout time.Duration `env:"SOUS_GATEWAY_WRITE_TIMEOUT" envDefault:"30s"`
	// IdleTimeout bounds a kept-alive connection's wait for its next
	// request (SOUS_GATEWAY_IDLE_TIMEOUT, default 60s).
	IdleTimeout time.Duration `env:"SOUS_GATEWAY_IDLE_TIMEOUT" envDefault:"60s"`
	// MaxHeaderBytes bounds a request's headers
	// (SOUS_GATEWAY_MAX_HEADER_BYTES, default 65536).
	MaxHeaderBytes int `env:"SOUS_GATEWAY_MAX_HEADER_BYTES" envDefault:"65536"`
	// Channels is the number of AMQP channels, each with its own direct
	// reply-to consumer, or with Service Bus the number of reply sessions
	// this gateway holds, each on its own receiver link
	// (SOUS_GATEWAY_CHANNELS, default 4).
	Channels int `env:"SOUS_GATEWAY_CHANNELS" envDefault:"4"`
	// ReplyQueue is the session-enabled Service Bus queue where workers
	// send results and chunks in the session each request names
	// (SOUS_GATEWAY_REPLY_QUEUE, default sous.replies; Service Bus only).
	ReplyQueue string `env:"SOUS_GATEWAY_REPLY_QUEUE" envDefault:"sous.replies"`
	// TLSCertFile and TLSKeyFile turn on HTTPS (SOUS_GATEWAY_TLS_CERT_FILE,
	// SOUS_GATEWAY_TLS_KEY_FILE).
	TLSCertFile string `env:"SOUS_GATEWAY_TLS_CERT_FILE"`
	TLSKeyFile  string `env:"SOUS_GATEWAY_TLS_KEY_FILE"`

	// Shared with the worker.
	Broker        string        `env:"SOUS_BROKER" envDefault:"rabbitmq"`
	AMQPURL       secret.Value  `env:"SOUS_AMQP_URL" envDefault:"amqp://guest:guest@localhost:5672/"`
	AMQPURLFile   string        `env:"SOUS_AMQP_URL_FILE"`
	AMQPCAFile    string        `env:"SOUS_AMQP_CA_FILE"`
	AMQPCertFile  string        `env:"SOUS_AMQP_CERT_FILE"`
	AMQPKeyFile   string        `env:"SOUS_AMQP_KEY_FILE"`
	AMQPHeartbeat time.Duration `env:"SOUS_AMQP_HEARTBEAT" envDefault:"10s"`

	ServiceBusConnectionString     secret.Value `env:"SOUS_SERVICEBUS_CONNECTION_STRING"`
	ServiceBusConnectionStringFile string       `env:"SOUS_SERVICEBUS_CONNECTION_STRING_FILE"`
	ServiceBusNamespace            string       `env:"SOUS_SERVICEBUS_NAMESPACE"`

	Queue string `env:"SOUS_QUEUE" envDefault:"sous.requests"`
	// DeadLetterQueue, Declare and MaxAttempts are read as the worker reads
	// them: with Declare (RabbitMQ) the gateway declares SOUS_QUEUE and its
	// dead-letter queue at each connect with the worker's arguments, so
	// that requests queue up (and KEDA counts them) before any worker runs
	// (SOUS_DEAD_LETTER_QUEUE, default <SOUS_QUEUE>.dlq; SOUS_DECLARE,
	// default true; SOUS_MAX_ATTEMPTS, default 5: the x-delivery-limit).
	DeadLetterQueue string `env:"SOUS_DEAD_LETTER_QUEUE"`
	Declare         bool   `env:"SOUS_DECLARE" envDefault:"true"`
	MaxAttempts     int    `env:"SOUS_MAX_ATTEMPTS" envDefault:"5"`
	// Lanes maps lane names to queues, highest rank first, in SOUS_LANES's
	// syntax (internal/lanes; shares are read but not used): each request
	// goes to the queue of the lane its X-Sous-Lane header or its key
	// names, else of the first (SOUS_GATEWAY_LANES; unset: every request
	// goes to SOUS_QUEUE). With Declare each lane's queue is declared with
	// its dead-letter queue: SOUS_DEAD_LETTER_QUEUE when set, else
	// <queue>.dlq, as the worker does.
	Lanes string `env:"SOUS_GATEWAY_LANES"`
	// WorkerLanes is the workers' SOUS_LANES, read only to warn when it is
	// set (a ConfigMap shared with the workers) and SOUS_GATEWAY_LANES is
	// not: the requests would all go to SOUS_QUEUE.
	WorkerLanes string `env:"SOUS_LANES"`
	// DatabaseURL is where the Batch API keeps files, batches and results
	// (SOUS_GATEWAY_DATABASE_URL, default sqlite:sous-gateway.db: an
	// embedded SQLite file, for ONE gateway replica; put it on a volume).
	// postgres://user:pass@host/db serves several replicas; off turns the
	// Batch API off.
	DatabaseURL secret.Value `env:"SOUS_GATEWAY_DATABASE_URL" envDefault:"sqlite:sous-gateway.db"`
	// BatchLane is the lane batch lines go to (SOUS_GATEWAY_BATCH_LANE;
	// default the last of SOUS_GATEWAY_LANES, the lowest-ranked, else
	// SOUS_QUEUE).
	BatchLane string `env:"SOUS_GATEWAY_BATCH_LANE"`
	// BatchResultsQueue is the durable queue where workers send batch
	// lines' results, consumed by every gateway replica
	// (SOUS_GATEWAY_BATCH_RESULTS_QUEUE, default sous.batch.results).
	BatchResultsQueue string `env:"SOUS_GATEWAY_BATCH_RESULTS_QUEUE" envDefault:"sous.batch.results"`
	// MaxFileBytes bounds an uploaded file (SOUS_GATEWAY_MAX_FILE_BYTES,
	// default 209715200, OpenAI's 200 MB).
	MaxFileBytes int64 `env:"SOUS_GATEWAY_MAX_FILE_BYTES" envDefault:"209715200"`
	// BatchMaxLines bounds a batch's requests (SOUS_GATEWAY_BATCH_MAX_LINES,
	// default 50000, OpenAI's limit).
	BatchMaxLines int `env:"SOUS_GATEWAY_BATCH_MAX_LINES" envDefault:"50000"`
	// BatchOutstanding bounds the batch lines, of all batches, published
	// and not yet answered (SOUS_GATEWAY_BATCH_OUTSTANDING, default 1000);
	// give it at least twice the slots of the whole fleet.
	BatchOutstanding int `env:"SOUS_GATEWAY_BATCH_OUTSTANDING" envDefault:"1000"`
	// UploadTimeout bounds the reading of one upload
	// (SOUS_GATEWAY_UPLOAD_TIMEOUT, default 10m).
	UploadTimeout time.Duration `env:"SOUS_GATEWAY_UPLOAD_TIMEOUT" envDefault:"10m"`
	// BatchCancelGrace bounds the wait, after a cancel, for the lines
	// already queued (SOUS_GATEWAY_BATCH_CANCEL_GRACE, default 10m).
	BatchCancelGrace time.Duration `env:"SOUS_GATEWAY_BATCH_CANCEL_GRACE" envDefault:"10m"`

	// lanes is Lanes parsed (nil when unset); deadLetterSet says
	// SOUS_DEAD_LETTER_QUEUE was given rather than defaulted.
	lanes         []lanes.Lane
	deadLetterSet bool
	// databaseSet says SOUS_GATEWAY_DATABASE_URL was given: a store that
	// cannot be opened is then an error, not a Batch API turned off.
	databaseSet bool

	Model          string        `env:"SOUS_MODEL"`
	ModelsAllowed  []string      `env:"SOUS_MODELS_ALLOWED" envSeparator:","`
	MaxBodyBytes   int           `env:"SOUS_MAX_BODY_BYTES" envDefault:"1048576"`
	MaxPromptBytes int           `env:"SOUS_MAX_PROMPT_BYTES" envDefault:"262144"`
	MaxNumPredict  int           `env:"SOUS_MAX_NUM_PREDICT" envDefault:"4096"`
	DrainTimeout   time.Duration `env:"SOUS_DRAIN_TIMEOUT" envDefault:"25s"`
	// HTTPAddr serves /healthz, /readyz and /metrics (SOUS_HTTP_ADDR,
	// default :8082: not the worker's :8080, so that a worker and a
	// gateway run side by side on one machine with no settings).
	HTTPAddr  string `env:"SOUS_HTTP_ADDR" envDefault:":8082"`
	LogLevel  string `env:"SOUS_LOG_LEVEL" envDefault:"info"`
	LogFormat string `env:"SOUS_LOG_FORMAT" envDefault:"json"`

	// OpenTelemetry, read as the worker reads it: spans (the gateway's
	// producer span continues the client's traceparent into the message)
	// go over OTLP when an endpoint is set; metrics are served at /metrics
	// (prometheus) and, with an endpoint, exported over OTLP too.
	OTelDisabled        string `env:"OTEL_SDK_DISABLED" envDefault:"false"`
	OTelServiceName     string `env:"OTEL_SERVICE_NAME" envDefault:"sous-gateway"`
	OTelTracesExporter  string `env:"OTEL_TRACES_EXPORTER"`
	OTelMetricsExporter string `env:"OTEL_METRICS_EXPORTER"`
	OTelEndpoint        string `env:"OTEL_EXPORTER_OTLP_ENDPOINT"`
	OTelTracesEndpoint  string `env:"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"`
	OTelMetricsEndpoint string `env:"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"`
	OTelProtocol        string `env:"OTEL_EXPORTER_OTLP_PROTOCOL" envDefault:"http/protobuf"`
	OTelTracesProtocol  string `env:"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"`
	OTelMetricsProtocol string `env:"OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"`
	// MetricsScopeLabels puts otel_scope_name and otel_scope_version on
	// every series of /metrics (SOUS_METRICS_SCOPE_LABELS, default false).
	MetricsScopeLabels bool `env:"SOUS_METRICS_SCOPE_LABELS" envDefault:"false"`
}

// configError names the variable that is wrong; main exits 2 on it.
type configError = brokerconfig.VarError

func bad(v, format string, args ...any) error { return brokerconfig.Bad(v, format, args...) }

// amqp is the RabbitMQ connection as configured.
func (c Config) amqp() brokerconfig.AMQP {
	return brokerconfig.AMQP{URL: c.AMQPURL, CAFile: c.AMQPCAFile, CertFile: c.AMQPCertFile, KeyFile: c.AMQPKeyFile, Heartbeat: c.AMQPHeartbeat}
}

// serviceBus is the Service Bus namespace as configured.
func (c Config) serviceBus() brokerconfig.ServiceBus {
	return brokerconfig.ServiceBus{ConnectionString: c.ServiceBusConnectionString, Namespace: c.ServiceBusNamespace}
}

// loadConfig reads the environment (environ as os.Environ gives it).
func loadConfig(environ []string) (Config, error) {
	var c Config
	if err := brokerconfig.Parse(&c, environ); err != nil {
		return c, err
	}
	if err := brokerconfig.ReadSecretFiles(
		brokerconfig.SecretFile{Var: "SOUS_AMQP_URL_FILE", Path: c.AMQPURLFile, Dst: &c.AMQPURL},
		brokerconfig.SecretFile{Var: "SOUS_SERVICEBUS_CONNECTION_STRING_FILE", Path: c.ServiceBusConnectionStringFile, Dst: &c.ServiceBusConnectionString},
	); err != nil {
		return c, err
	}
	c.deadLetterSet = c.DeadLetterQueue != ""
	for _, kv := range environ {
		if strings.HasPrefix(kv, "SOUS_GATEWAY_DATABASE_URL=") {
			c.databaseSet = true
		}
	}
	if c.DeadLetterQueue == "" {
		c.DeadLetterQueue = c.Queue + ".dlq"
	}
	if err := c.validate(); err != nil {
		return c, err
	}
	if strings.TrimSpace(c.Lanes) != "" {
		c.lanes, _ = lanes.Parse(c.Lanes, c.Queue) // validate has read it
	}
	return c, nil
}

// laneDeadLetterQueue is the dead-letter queue of a lane's requests, as
// the worker has it: SOUS_DEAD_LETTER_QUEUE when set (every lane shares
// it), else the lane's queue + ".dlq".
func (c Config) laneDeadLetterQueue(l lanes.Lane) string {
	if c.deadLetterSet {
		return c.DeadLetterQueue
	}
	return l.Queue + ".dlq"
}

// laneNames are the lanes' names, nil without lanes.
func (c Config) laneNames() []string {
	if len(c.lanes) == 0 {
		return nil
	}
	return lanes.Names(c.lanes)
}

// validateLanes checks SOUS_GATEWAY_LANES.
func (c Config) validateLanes() error {
	if strings.TrimSpace(c.Lanes) == "" {
		return nil
	}
	ls, err := lanes.Parse(c.Lanes, c.Queue)
	if err != nil {
		return bad("SOUS_GATEWAY_LANES", "%v", err)
	}
	limit := 255
	if c.Broker == "servicebus" {
		limit = 260
	}
	queues := map[string]string{}
	for _, l := range ls {
		queues[l.Queue] = l.Name
	}
	for _, l := range ls {
		if len(l.Queue) > limit {
			return bad("SOUS_GATEWAY_LANES", "lane %q: a queue name is at most %d bytes", l.Name, limit)
		}
		if c.Broker == "servicebus" && l.Queue == c.ReplyQueue {
			return bad("SOUS_GATEWAY_LANES", "lane %q: its queue %q is also SOUS_GATEWAY_REPLY_QUEUE", l.Name, l.Queue)
		}
		if c.Broker == "rabbitmq" {
			dlq := c.laneDeadLetterQueue(l)
			if other, ok := queues[dlq]; ok {
				return bad("SOUS_GATEWAY_LANES", "lane %q: its dead-letter queue %q is the queue of lane %q", l.Name, dlq, other)
			}
			if len(dlq) > 255 {
				return bad("SOUS_GATEWAY_LANES", "lane %q: its dead-letter queue %q is longer than 255 bytes", l.Name, dlq)
			}
		}
	}
	return nil
}

func (c Config) validate() error {
	switch c.Broker {
	case "rabbitmq":
		if err := c.amqp().Check(); err != nil {
			return err
		}
	case "servicebus":
		if err := c.serviceBus().Check(); err != nil {
			return err
		}
		if c.ReplyQueue == "" || len(c.ReplyQueue) > 260 {
			return bad("SOUS_GATEWAY_REPLY_QUEUE", "must be the name of a session-enabled queue, 1 to 260 characters")
		}
		if c.ReplyQueue == c.Queue {
			return bad("SOUS_GATEWAY_REPLY_QUEUE", "must differ from SOUS_QUEUE: replies go to a session-enabled queue of their own")
		}
	default:
		return bad("SOUS_BROKER", "%q is not a broker sous knows; use rabbitmq or servicebus", c.Broker)
	}
	if c.Queue == "" || len(c.Queue) > 255 {
		return bad("SOUS_QUEUE", "must be a queue name of 1 to 255 bytes")
	}
	if c.Broker == "rabbitmq" {
		if c.DeadLetterQueue == "" || len(c.DeadLetterQueue) > 255 {
			return bad("SOUS_DEAD_LETTER_QUEUE", "must be a queue name of 1 to 255 bytes")
		}
		if c.DeadLetterQueue == c.Queue {
			return bad("SOUS_DEAD_LETTER_QUEUE", "must differ from SOUS_QUEUE")
		}
	}
	if err := c.validateLanes(); err != nil {
		return err
	}
	if err := c.validateBatch(); err != nil {
		return err
	}
	if c.Model == "" {
		return bad("SOUS_MODEL", "is required: the model requests use when they name none (for example llama3.2)")
	}
	for _, m := range c.ModelsAllowed {
		if strings.TrimSpace(m) == "" {
			return bad("SOUS_MODELS_ALLOWED", "has an empty entry; list model names separated by commas, e.g. llama3.2,qwen2.5")
		}
	}
	if _, _, err := net.SplitHostPort(c.Addr); err != nil {
		return bad("SOUS_GATEWAY_ADDR", "must be host:port or :port, got %q", c.Addr)
	}
	if c.HTTPAddr != "off" {
		if _, _, err := net.SplitHostPort(c.HTTPAddr); err != nil {
			return bad("SOUS_HTTP_ADDR", "must be host:port or :port (or off), got %q", c.HTTPAddr)
		}
	}
	if (c.TLSCertFile == "") != (c.TLSKeyFile == "") {
		return bad("SOUS_GATEWAY_TLS_CERT_FILE", "set SOUS_GATEWAY_TLS_CERT_FILE and SOUS_GATEWAY_TLS_KEY_FILE together to serve HTTPS")
	}
	if c.TLSCertFile != "" {
		if _, err := tls.LoadX509KeyPair(c.TLSCertFile, c.TLSKeyFile); err != nil {
			return bad("SOUS_GATEWAY_TLS_CERT_FILE", "cannot load the certificate and key: %v", err)
		}
	}
	if c.Rate < 0 {
		return bad("SOUS_GATEWAY_RATE", "must be requests per second, 0 or more (0: no limit)")
	}
	if c.Rate > 0 && c.KeysFile == "" {
		return bad("SOUS_GATEWAY_RATE", "is a rate per API key: set SOUS_GATEWAY_KEYS_FILE too, or leave it 0")
	}
	positive := []struct {
		name string
		v    int64
	}{
		{"SOUS_GATEWAY_TIMEOUT", int64(c.Timeout)}, {"SOUS_GATEWAY_KEEPALIVE", int64(c.KeepAlive)},
		{"SOUS_GATEWAY_RETRY_AFTER", int64(c.RetryAfter)}, {"SOUS_GATEWAY_MAX_OPEN", int64(c.MaxOpen)},
		{"SOUS_GATEWAY_CHANNELS", int64(c.Channels)}, {"SOUS_GATEWAY_KEYS_RELOAD", int64(c.KeysReload)},
		{"SOUS_MAX_BODY_BYTES", int64(c.MaxBodyBytes)}, {"SOUS_MAX_PROMPT_BYTES", int64(c.MaxPromptBytes)},
		{"SOUS_MAX_NUM_PREDICT", int64(c.MaxNumPredict)}, {"SOUS_DRAIN_TIMEOUT", int64(c.DrainTimeout)},
		{"SOUS_MAX_ATTEMPTS", int64(c.MaxAttempts)},
		{"SOUS_GATEWAY_MAX_CONNS", int64(c.MaxConns)}, {"SOUS_GATEWAY_MAX_INTAKE", int64(c.MaxIntake)}, {"SOUS_GATEWAY_HEADER_TIMEOUT", int64(c.HeaderTimeout)},
		{"SOUS_GATEWAY_BODY_TIMEOUT", int64(c.BodyTimeout)}, {"SOUS_GATEWAY_WRITE_TIMEOUT", int64(c.WriteTimeout)},
		{"SOUS_GATEWAY_IDLE_TIMEOUT", int64(c.IdleTimeout)}, {"SOUS_GATEWAY_MAX_HEADER_BYTES", int64(c.MaxHeaderBytes)},
	}
	for _, p := range positive {
		if p.v <= 0 {
			return bad(p.name, "must be greater than zero")
		}
	}
	if c.WriteTimeout <= c.KeepAlive {
		return bad("SOUS_GATEWAY_WRITE_TIMEOUT", "is %s; it must be longer than SOUS_GATEWAY_KEEPALIVE (%s), or a waiting stream times out between two keep-alive comments", c.WriteTimeout, c.KeepAlive)
	}
	if c.MaxHeaderBytes < 4096 {
		return bad("SOUS_GATEWAY_MAX_HEADER_BYTES", "is %d; at least 4096", c.MaxHeaderBytes)
	}
	if c.MaxIntake > c.MaxOpen {
		return bad("SOUS_GATEWAY_MAX_INTAKE", "is %d; at most SOUS_GATEWAY_MAX_OPEN (%d)", c.MaxIntake, c.MaxOpen)
	}
	if c.MaxConns > 1<<20 || c.MaxOpen > 1<<20 {
		return bad("SOUS_GATEWAY_MAX_CONNS", "and SOUS_GATEWAY_MAX_OPEN must be at most %d", 1<<20)
	}
	if c.Channels > 64 {
		return bad("SOUS_GATEWAY_CHANNELS", "is %d; at most 64", c.Channels)
	}
	if _, err := parseLevel(c.LogLevel); err != nil {
		return bad("SOUS_LOG_LEVEL", "%v", err)
	}
	if c.LogFormat != "json" && c.LogFormat != "text" {
		return bad("SOUS_LOG_FORMAT", "must be json or text")
	}
	switch strings.ToLower(strings.TrimSpace(c.OTelDisabled)) {
	case "true", "false", "":
	default:
		return bad("OTEL_SDK_DISABLED", "must be true or false")
	}
	switch c.OTelTracesExporter {
	case "", "otlp", "none":
	default:
		return bad("OTEL_TRACES_EXPORTER", "%q is not supported; use otlp or none", c.OTelTracesExporter)
	}
	for _, e := range c.metricsExporters() {
		if e != "prometheus" && e != "otlp" && e != "none" {
			return bad("OTEL_METRICS_EXPORTER", "%q is not supported; use prometheus, otlp or none", e)
		}
	}
	for _, p := range []struct{ name, v string }{
		{"OTEL_EXPORTER_OTLP_PROTOCOL", c.OTelProtocol}, {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", c.OTelTracesProtocol}, {"OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", c.OTelMetricsProtocol},
	} {
		if p.v != "" && p.v != telemetry.ProtocolHTTP && p.v != telemetry.ProtocolGRPC {
			return bad(p.name, "%q is not supported; use %s or %s", p.v, telemetry.ProtocolHTTP, telemetry.ProtocolGRPC)
		}
	}
	return nil
}

// batchOn says whether the Batch API is on: a database, and RabbitMQ
// (results come back on a queue every replica consumes).
func (c Config) batchOn() bool {
	return c.DatabaseURL.Reveal() != "off" && c.Broker == "rabbitmq"
}

// batchLane is the lane batch lines go to.
func (c Config) batchLane() lanes.Lane {
	ls := c.lanes
	if len(ls) == 0 && strings.TrimSpace(c.Lanes) != "" {
		ls, _ = lanes.Parse(c.Lanes, c.Queue)
	}
	if len(ls) == 0 {
		return lanes.Lane{Queue: c.Queue}
	}
	if c.BatchLane != "" {
		l, _ := lanes.Find(ls, c.BatchLane)
		return l
	}
	return ls[len(ls)-1]
}

func (c Config) validateBatch() error {
	u := c.DatabaseURL.Reveal()
	if u == "off" {
		return nil
	}
	if !strings.HasPrefix(u, "sqlite:") && !strings.HasPrefix(u, "postgres://") && !strings.HasPrefix(u, "postgresql://") {
		return bad("SOUS_GATEWAY_DATABASE_URL", "must be sqlite:PATH (one gateway replica), postgres://USER:PASSWORD@HOST:PORT/DB (several), or off (no Batch API)")
	}
	if c.BatchLane != "" {
		if strings.TrimSpace(c.Lanes) == "" {
			return bad("SOUS_GATEWAY_BATCH_LANE", "names a lane, but SOUS_GATEWAY_LANES is not set: unset it (batch lines go to SOUS_QUEUE) or set the lanes")
		}
		ls, _ := lanes.Parse(c.Lanes, c.Queue)
		if _, ok := lanes.Find(ls, c.BatchLane); !ok {
			return bad("SOUS_GATEWAY_BATCH_LANE", "%q is not one of SOUS_GATEWAY_LANES (%s)", c.BatchLane, strings.Join(lanes.Names(ls), ", "))
		}
	}
	if c.BatchResultsQueue == "" || len(c.BatchResultsQueue) > 255 {
		return bad("SOUS_GATEWAY_BATCH_RESULTS_QUEUE", "must be a queue name of 1 to 255 bytes")
	}
	if c.BatchResultsQueue == c.Queue || c.BatchResultsQueue == c.DeadLetterQueue {
		return bad("SOUS_GATEWAY_BATCH_RESULTS_QUEUE", "must differ from SOUS_QUEUE and SOUS_DEAD_LETTER_QUEUE")
	}
	for _, p := range []struct {
		name string
		v    int64
	}{
		{"SOUS_GATEWAY_MAX_FILE_BYTES", c.MaxFileBytes}, {"SOUS_GATEWAY_BATCH_MAX_LINES", int64(c.BatchMaxLines)},
		{"SOUS_GATEWAY_BATCH_OUTSTANDING", int64(c.BatchOutstanding)}, {"SOUS_GATEWAY_UPLOAD_TIMEOUT", int64(c.UploadTimeout)},
		{"SOUS_GATEWAY_BATCH_CANCEL_GRACE", int64(c.BatchCancelGrace)},
	} {
		if p.v <= 0 {
			return bad(p.name, "must be greater than zero")
		}
	}
	return nil
}

func (c Config) otelDisabled() bool {
	return strings.EqualFold(strings.TrimSpace(c.OTelDisabled), "true")
}

func (c Config) metricsExporters() []string {
	var out []string
	for e := range strings.SplitSeq(c.OTelMetricsExporter, ",") {
		if e = strings.TrimSpace(e); e != "" {
			out = append(out, e)
		}
	}
	return out
}

// metricReaders says where metrics go, as for the worker: /metrics
// (prometheus; not with SOUS_HTTP_ADDR=off), OTLP, both or neither.
// OTEL_METRICS_EXPORTER unset means prometheus, plus otlp when an OTLP
// endpoint is set.
func (c Config) metricReaders() (prom, otlp bool) {
	if c.otelDisabled() {
		return false, false
	}
	list := c.metricsExporters()
	if len(list) == 0 {
		return c.HTTPAddr != "off", c.OTelEndpoint != "" || c.OTelMetricsEndpoint != ""
	}
	return slices.Contains(list, "prometheus") && c.HTTPAddr != "off", slices.Contains(list, "otlp")
}

// allowedModels is SOUS_MODEL plus SOUS_MODELS_ALLOWED, as the worker reads
// them: what GET /v1/models lists and requests may name.
func allowedModels(c Config) []string {
	out := []string{c.Model}
	for _, m := range c.ModelsAllowed {
		if m = strings.TrimSpace(m); m != "" && !slices.Contains(out, m) {
			out = append(out, m)
		}
	}
	return out
}

func parseLevel(s string) (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return l, fmt.Errorf("%q is not one of debug, info, warn, error", s)
	}
	return l, nil
}

// warnUnknownEnv logs each SOUS_* variable of environ that no part of sous
// reads, with the known one closest to it: a misspelled SOUS_ENGINE_URL (one letter short)
// would otherwise leave the default in force without a word. A warning,
// not a refusal: the ConfigMap a worker and a gateway share may carry
// variables of a newer version during a rollout.
func warnUnknownEnv(log *slog.Logger, environ []string) {
	for _, u := range envcheck.Check(environ, envcheck.Tags(reflect.TypeFor[Config]())) {
		log.Warn("unknown SOUS_* variable, ignored; is it misspelled?", "var", u.Name, "did_you_mean", u.Closest)
	}
}
