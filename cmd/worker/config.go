package main

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"reflect"
	"strconv"
	"strings"
	"time"

	"github.com/caarlos0/env/v11"

	"github.com/sous-run/sous/internal/brokerconfig"
	"github.com/sous-run/sous/internal/envcheck"
	"github.com/sous-run/sous/internal/gpu"
	"github.com/sous-run/sous/internal/lanes"
	"github.com/sous-run/sous/internal/queue/rabbitmq"
	"github.com/sous-run/sous/internal/secret"
	"github.com/sous-run/sous/internal/sizing"
	"github.com/sous-run/sous/internal/worker"
)

// Config is everything the worker reads from its environment. Each field
// names its variable and default; README.md lists them all (a test checks).
type Config struct {
	// Broker
	Broker          string       `env:"SOUS_BROKER" envDefault:"rabbitmq"`
	AMQPURL         secret.Value `env:"SOUS_AMQP_URL" envDefault:"amqp://guest:guest@localhost:5672/"`
	AMQPURLFile     string       `env:"SOUS_AMQP_URL_FILE"`
	AMQPCAFile      string       `env:"SOUS_AMQP_CA_FILE"`
	AMQPCertFile    string       `env:"SOUS_AMQP_CERT_FILE"`
	AMQPKeyFile     string       `env:"SOUS_AMQP_KEY_FILE"`
	Queue           string       `env:"SOUS_QUEUE" envDefault:"sous.requests"`
	ResultsQueue    string       `env:"SOUS_RESULTS_QUEUE" envDefault:"sous.results"`
	DeadLetterQueue string       `env:"SOUS_DEAD_LETTER_QUEUE"` // default <queue>.dlq
	Declare         bool         `env:"SOUS_DECLARE" envDefault:"true"`
	// Lanes lists the queues the worker consumes, highest rank first:
	// "interactive=sous.interactive,bulk=sous.bulk:share=0.2"
	// (internal/lanes). Unset: one lane on SOUS_QUEUE.
	Lanes string `env:"SOUS_LANES"`
	// lanes is Lanes parsed; deadLetterSet says SOUS_DEAD_LETTER_QUEUE was
	// given (shared by every lane) rather than defaulted (<queue>.dlq each).
	lanes         []lanes.Lane
	deadLetterSet bool
	// ReportInterval is how often the worker reports each lane's measured
	// rates to the scaler (fleet.Exchange); 0 turns reports off
	// (SOUS_REPORT_INTERVAL, default 5s).
	ReportInterval time.Duration `env:"SOUS_REPORT_INTERVAL" envDefault:"5s"`

	// AMQPConsumerTimeout is the broker's consumer_timeout (RabbitMQ's
	// default is 30m): RabbitMQ closes the channel of a consumer that
	// holds a delivery unacknowledged longer, and every delivery on it
	// is redelivered. validate refuses an SOUS_ENGINE_TIMEOUT that could
	// hold one that long; 0 turns the check off (SOUS_AMQP_CONSUMER_TIMEOUT,
	// default 30m).
	AMQPConsumerTimeout time.Duration `env:"SOUS_AMQP_CONSUMER_TIMEOUT" envDefault:"30m"`
	// AMQPHeartbeat is the AMQP heartbeat interval; a dead link is noticed
	// after about three missed beats (SOUS_AMQP_HEARTBEAT, default 10s).
	AMQPHeartbeat time.Duration `env:"SOUS_AMQP_HEARTBEAT" envDefault:"10s"`

	// Service Bus
	ServiceBusConnectionString     secret.Value  `env:"SOUS_SERVICEBUS_CONNECTION_STRING"`
	ServiceBusConnectionStringFile string        `env:"SOUS_SERVICEBUS_CONNECTION_STRING_FILE"`
	ServiceBusNamespace            string        `env:"SOUS_SERVICEBUS_NAMESPACE"`
	ServiceBusDeadLetterQueue      string        `env:"SOUS_SERVICEBUS_DEAD_LETTER_QUEUE"`
	ServiceBusLockRenew            time.Duration `env:"SOUS_SERVICEBUS_LOCK_RENEW_INTERVAL" envDefault:"20s"`
	// ServiceBusMaxSenders bounds the cached senders, one per reply queue;
	// the least recently used is closed beyond it
	// (SOUS_SERVICEBUS_MAX_SENDERS, default 64).
	ServiceBusMaxSenders int `env:"SOUS_SERVICEBUS_MAX_SENDERS" envDefault:"64"`

	// Engine
	Engine           string        `env:"SOUS_ENGINE" envDefault:"ollama"`
	EngineURL        string        `env:"SOUS_ENGINE_URL" envDefault:"http://localhost:11434"`
	EngineAPIKey     secret.Value  `env:"SOUS_ENGINE_API_KEY"`
	EngineAPIKeyFile string        `env:"SOUS_ENGINE_API_KEY_FILE"`
	EngineTimeout    time.Duration `env:"SOUS_ENGINE_TIMEOUT" envDefault:"5m"`
	EngineParallel   string        `env:"SOUS_ENGINE_PARALLEL" envDefault:"auto"`
	// EngineQueueInterval is how often the worker reads the engine's
	// running/waiting gauges when it adapts the slots to them.
	EngineQueueInterval time.Duration `env:"SOUS_ENGINE_QUEUE_INTERVAL" envDefault:"1s"`
	EngineKeepAlive     time.Duration `env:"SOUS_ENGINE_KEEP_ALIVE" envDefault:"0s"`
	EngineExec          string        `env:"SOUS_ENGINE_EXEC"`
	EngineStartTimeout  time.Duration `env:"SOUS_ENGINE_START_TIMEOUT" envDefault:"5m"`
	EngineBatchPrompts  string        `env:"SOUS_ENGINE_BATCH_PROMPTS" envDefault:"auto"`
	// OllamaNumParallel is the child Ollama's slots, inherited from the
	// worker's environment: with SOUS_ENGINE_EXEC and
	// SOUS_ENGINE_PARALLEL=auto it is the engine saying them.
	OllamaNumParallel string   `env:"OLLAMA_NUM_PARALLEL"`
	Model             string   `env:"SOUS_MODEL"`
	ModelsAllowed     []string `env:"SOUS_MODELS_ALLOWED" envSeparator:","`

	// Batching
	BatchMin         int           `env:"SOUS_BATCH_MIN" envDefault:"1"`
	BatchMax         int           `env:"SOUS_BATCH_MAX" envDefault:"32"`
	BatchWait        time.Duration `env:"SOUS_BATCH_WAIT" envDefault:"20ms"`
	BatchConcurrency int           `env:"SOUS_BATCH_CONCURRENCY"`
	BatchItemBytes   int64         `env:"SOUS_BATCH_ITEM_BYTES" envDefault:"0"`
	BatchGrowthStep  int           `env:"SOUS_BATCH_GROWTH_STEP" envDefault:"1"`

	// GPU
	GPUDevices         string        `env:"SOUS_GPU_DEVICES"`
	NvidiaVisible      string        `env:"NVIDIA_VISIBLE_DEVICES"`
	GPUReserveBytes    int64         `env:"SOUS_GPU_RESERVE_BYTES" envDefault:"0"`
	GPURefresh         time.Duration `env:"SOUS_GPU_REFRESH" envDefault:"2s"`
	ModelContextLength int           `env:"SOUS_MODEL_CONTEXT_LENGTH" envDefault:"0"`
	KVBytesPerToken    int           `env:"SOUS_KV_BYTES_PER_TOKEN" envDefault:"0"`

	// Reliability and limits
	MaxAttempts     int           `env:"SOUS_MAX_ATTEMPTS" envDefault:"5"`
	MaxBodyBytes    int           `env:"SOUS_MAX_BODY_BYTES" envDefault:"1048576"`
	MaxPromptBytes  int           `env:"SOUS_MAX_PROMPT_BYTES" envDefault:"262144"`
	MaxNumPredict   int           `env:"SOUS_MAX_NUM_PREDICT" envDefault:"4096"`
	DrainTimeout    time.Duration `env:"SOUS_DRAIN_TIMEOUT" envDefault:"25s"`
	RetryBackoff    time.Duration `env:"SOUS_RETRY_BACKOFF" envDefault:"500ms"`
	RetryBackoffMax time.Duration `env:"SOUS_RETRY_BACKOFF_MAX" envDefault:"30s"`

	// Streaming
	StreamInterval time.Duration `env:"SOUS_STREAM_INTERVAL" envDefault:"50ms"`
	StreamBytes    int           `env:"SOUS_STREAM_BYTES" envDefault:"256"`

	// Operations
	HTTPAddr  string `env:"SOUS_HTTP_ADDR" envDefault:":8080"`
	LogLevel  string `env:"SOUS_LOG_LEVEL" envDefault:"info"`
	LogFormat string `env:"SOUS_LOG_FORMAT" envDefault:"json"`
	WorkerID  string `env:"SOUS_WORKER_ID"` // default: host name
	Pprof     bool   `env:"SOUS_PPROF" envDefault:"false"`

	// OpenTelemetry: the standard OTEL_* variables (telemetry.go).
	Telemetry telemetryConfig

	// Busy-aware scale-in on Kubernetes (podcost.go).
	PodCost podCostConfig
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
	vars := make(map[string]string, len(environ))
	for _, kv := range environ {
		if k, v, ok := strings.Cut(kv, "="); ok {
			vars[k] = v
		}
	}
	var c Config
	if err := env.ParseWithOptions(&c, env.Options{Environment: vars}); err != nil {
		return c, describeEnvError(err)
	}
	if err := c.readSecretFiles(); err != nil {
		return c, err
	}
	c.deadLetterSet = c.DeadLetterQueue != ""
	if c.DeadLetterQueue == "" {
		c.DeadLetterQueue = c.Queue + ".dlq"
	}
	if c.WorkerID == "" {
		c.WorkerID, _ = os.Hostname()
	}
	if err := c.validate(); err != nil {
		return c, err
	}
	c.lanes, _ = lanes.Parse(c.Lanes, c.Queue) // validate has read it
	return c, nil
}

// describeEnvError keeps env's message, which names the variable, and drops
// the value it could not parse (it may be a secret).
func describeEnvError(err error) error {
	var agg env.AggregateError
	if errors.As(err, &agg) && len(agg.Errors) > 0 {
		var pe env.ParseError
		if errors.As(agg.Errors[0], &pe) {
			return bad(envName(pe.Name), "%s", expected(pe.Type, envName(pe.Name)))
		}
		return fmt.Errorf("configuration: %w", agg.Errors[0])
	}
	return fmt.Errorf("configuration: %w", err)
}

// expected says what a variable of type t must look like, with its default
// as the example where there is one.
func expected(t reflect.Type, name string) string {
	example := ""
	for _, v := range configVars() {
		if v.name == name && v.def != "" && !v.secret {
			example = v.def
		}
	}
	like := func(what, fallback string) string {
		if example == "" {
			example = fallback
		}
		return fmt.Sprintf("must be %s, such as %s", what, example)
	}
	switch {
	case t == reflect.TypeFor[time.Duration]():
		return like("a duration with a unit (ms, s, m, h)", "20ms")
	case t.Kind() == reflect.Bool:
		return "must be true or false"
	case t.Kind() >= reflect.Int && t.Kind() <= reflect.Int64:
		return like("a whole number", "4")
	case t.Kind() >= reflect.Uint && t.Kind() <= reflect.Uint64:
		return like("a whole number, 0 or more", "4")
	case t.Kind() == reflect.Float32 || t.Kind() == reflect.Float64:
		return like("a number", "0.5")
	}
	return fmt.Sprintf("cannot be read as %s", t)
}

func envName(field string) string {
	t, ok := configFieldTags()[field]
	if !ok {
		return field
	}
	return t
}

func (c *Config) readSecretFiles() error {
	return brokerconfig.ReadSecretFiles(
		brokerconfig.SecretFile{Var: "SOUS_AMQP_URL_FILE", Path: c.AMQPURLFile, Dst: &c.AMQPURL},
		brokerconfig.SecretFile{Var: "SOUS_ENGINE_API_KEY_FILE", Path: c.EngineAPIKeyFile, Dst: &c.EngineAPIKey},
		brokerconfig.SecretFile{Var: "SOUS_SERVICEBUS_CONNECTION_STRING_FILE", Path: c.ServiceBusConnectionStringFile, Dst: &c.ServiceBusConnectionString},
	)
}

func (c Config) validate() error {
	switch c.Broker {
	case "rabbitmq":
		if err := c.amqp().Check(); err != nil {
			return err
		}
		if c.AMQPConsumerTimeout < 0 {
			return bad("SOUS_AMQP_CONSUMER_TIMEOUT", "must be the broker's consumer_timeout, or 0 to skip the check")
		}
		// A delivery waits for a slot at most maxWait (then it goes back to
		// the queue), then runs: what is left must fit consumer_timeout.
		if run := worker.HoldBound(0, c.EngineTimeout, c.RetryBackoffMax, c.BatchWait); c.AMQPConsumerTimeout > 0 && run >= c.AMQPConsumerTimeout {
			return bad("SOUS_ENGINE_TIMEOUT", "is %s: one engine call with its pause (SOUS_ENGINE_TIMEOUT and up to a tenth more, 1s at most, + SOUS_RETRY_BACKOFF_MAX + SOUS_BATCH_WAIT = %s) "+
				"reaches the broker's consumer_timeout (SOUS_AMQP_CONSUMER_TIMEOUT=%s): RabbitMQ would close the channel and redeliver every request in flight. "+
				"Lower SOUS_ENGINE_TIMEOUT, or raise consumer_timeout on the broker and SOUS_AMQP_CONSUMER_TIMEOUT with it", c.EngineTimeout, run, c.AMQPConsumerTimeout)
		}
	case "servicebus":
		if err := c.serviceBus().Check(); err != nil {
			return err
		}
		if c.ServiceBusMaxSenders <= 0 {
			return bad("SOUS_SERVICEBUS_MAX_SENDERS", "must be greater than zero")
		}
	default:
		return bad("SOUS_BROKER", "%q is not a broker sous knows; use rabbitmq or servicebus", c.Broker)
	}
	for _, q := range []struct{ name, v string }{{"SOUS_QUEUE", c.Queue}, {"SOUS_RESULTS_QUEUE", c.ResultsQueue}, {"SOUS_DEAD_LETTER_QUEUE", c.DeadLetterQueue}} {
		if q.v == "" || len(q.v) > 255 {
			return bad(q.name, "must be a queue name of 1 to 255 bytes")
		}
	}
	if c.DeadLetterQueue == c.Queue {
		return bad("SOUS_DEAD_LETTER_QUEUE", "must differ from SOUS_QUEUE")
	}
	if c.ReportInterval < 0 {
		return bad("SOUS_REPORT_INTERVAL", "must be a duration such as 5s, or 0 to send no reports")
	}
	ls, err := lanes.Parse(c.Lanes, c.Queue)
	if err != nil {
		return bad("SOUS_LANES", "%v", err)
	}
	for _, l := range ls {
		if len(l.Queue) > 255 {
			return bad("SOUS_LANES", "lane %q: a queue name is at most 255 bytes", l.Name)
		}
		if l.Queue == c.ResultsQueue || l.Queue == c.DeadLetterQueue && c.deadLetterSet {
			return bad("SOUS_LANES", "lane %q: its queue %q is also SOUS_RESULTS_QUEUE or SOUS_DEAD_LETTER_QUEUE", l.Name, l.Queue)
		}
	}

	switch c.Engine {
	case "ollama", "openai":
	default:
		return bad("SOUS_ENGINE", "%q is not an engine sous knows; use ollama or openai", c.Engine)
	}
	if u, err := url.Parse(c.EngineURL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return bad("SOUS_ENGINE_URL", "must be an http:// or https:// URL such as http://localhost:11434")
	}
	for _, m := range c.ModelsAllowed {
		if strings.TrimSpace(m) == "" {
			return bad("SOUS_MODELS_ALLOWED", "has an empty entry; list model names separated by commas, e.g. llama3.2,qwen2.5")
		}
	}
	if c.EngineBatchPrompts != "auto" && c.EngineBatchPrompts != "list" && c.EngineBatchPrompts != "single" {
		return bad("SOUS_ENGINE_BATCH_PROMPTS", "must be auto, list or single")
	}
	if c.EngineExec != "" && c.EngineStartTimeout <= 0 {
		return bad("SOUS_ENGINE_START_TIMEOUT", "must be greater than zero")
	}
	if c.Model == "" {
		return bad("SOUS_MODEL", "is required: the model requests use when they name none (for example llama3.2)")
	}
	positive := []struct {
		name string
		v    int64
	}{
		{"SOUS_BATCH_MIN", int64(c.BatchMin)}, {"SOUS_BATCH_MAX", int64(c.BatchMax)},
		{"SOUS_MAX_ATTEMPTS", int64(c.MaxAttempts)},
		{"SOUS_MAX_BODY_BYTES", int64(c.MaxBodyBytes)}, {"SOUS_MAX_PROMPT_BYTES", int64(c.MaxPromptBytes)},
		{"SOUS_MAX_NUM_PREDICT", int64(c.MaxNumPredict)}, {"SOUS_STREAM_BYTES", int64(c.StreamBytes)},
		{"SOUS_ENGINE_TIMEOUT", int64(c.EngineTimeout)}, {"SOUS_DRAIN_TIMEOUT", int64(c.DrainTimeout)},
		{"SOUS_BATCH_WAIT", int64(c.BatchWait)}, {"SOUS_RETRY_BACKOFF", int64(c.RetryBackoff)},
		{"SOUS_RETRY_BACKOFF_MAX", int64(c.RetryBackoffMax)}, {"SOUS_STREAM_INTERVAL", int64(c.StreamInterval)},
	}
	for _, p := range positive {
		if p.v <= 0 {
			return bad(p.name, "must be greater than zero")
		}
	}
	if c.BatchConcurrency < 0 {
		return bad("SOUS_BATCH_CONCURRENCY", "has no effect any more (requests are dispatched continuously up to the in-flight limit); unset it")
	}
	if _, err := c.engineParallel(); err != nil {
		return err
	}
	if c.BatchMin > c.BatchMax {
		return bad("SOUS_BATCH_MIN", "is %d, above SOUS_BATCH_MAX (%d)", c.BatchMin, c.BatchMax)
	}
	if c.BatchMax > 4096 {
		return bad("SOUS_BATCH_MAX", "is %d; at most 4096", c.BatchMax)
	}
	if pf := worker.Capacity(c.BatchMax); c.Broker == "rabbitmq" && 3*c.BatchMax > rabbitmq.MaxPrefetch {
		// Unreachable with SOUS_BATCH_MAX at most 4096 (a prefetch of
		// 12,288), kept so that raising that bound cannot wrap the
		// prefetch: AMQP carries it in 16 bits and amqp091-go would send
		// 65,536 as 0, unlimited: the whole queue on one worker.
		return bad("SOUS_BATCH_MAX", "is %d: the worker's prefetch would be %d, above %d, the most RabbitMQ's prefetch count can hold", c.BatchMax, pf, rabbitmq.MaxPrefetch)
	}
	if c.RetryBackoff > c.RetryBackoffMax {
		return bad("SOUS_RETRY_BACKOFF", "is above SOUS_RETRY_BACKOFF_MAX")
	}
	if _, err := gpu.ParseDevices(c.GPUDevices, c.NvidiaVisible); err != nil {
		return bad("SOUS_GPU_DEVICES", "%v", err)
	}
	if c.GPURefresh <= 0 {
		return bad("SOUS_GPU_REFRESH", "must be greater than zero")
	}
	if c.EngineQueueInterval < 100*time.Millisecond {
		return bad("SOUS_ENGINE_QUEUE_INTERVAL", "must be at least 100ms (how often the engine's running/waiting gauges are read); got %v", c.EngineQueueInterval)
	}
	if _, err := sizing.New(nil, c.sizingConfig()); err != nil {
		return err // sizing names the variable
	}
	if _, err := parseLevel(c.LogLevel); err != nil {
		return bad("SOUS_LOG_LEVEL", "%v", err)
	}
	if c.LogFormat != "json" && c.LogFormat != "text" {
		return bad("SOUS_LOG_FORMAT", "must be json or text")
	}
	if c.HTTPAddr != "" && c.HTTPAddr != "off" {
		if _, _, err := net.SplitHostPort(c.HTTPAddr); err != nil {
			return bad("SOUS_HTTP_ADDR", "must be host:port or :port (or off), got %q", c.HTTPAddr)
		}
	}
	if err := c.PodCost.validate(); err != nil {
		return err
	}
	return c.Telemetry.validate()
}

func parseLevel(s string) (slog.Level, error) {
	var l slog.Level
	err := l.UnmarshalText([]byte(s))
	if err != nil {
		return l, fmt.Errorf("%q is not one of debug, info, warn, error", s)
	}
	return l, nil
}

// configFieldTags maps Config field names to their variables, nested
// structs (Telemetry) included.
func configFieldTags() map[string]string {
	out := map[string]string{}
	var walk func(t reflect.Type, prefix string)
	walk = func(t reflect.Type, prefix string) {
		for i := range t.NumField() {
			f := t.Field(i)
			if tag := f.Tag.Get("env"); tag != "" {
				out[prefix+f.Name] = strings.Split(tag, ",")[0]
			} else if f.Type.Kind() == reflect.Struct {
				walk(f.Type, prefix+f.Name+".")
			}
		}
	}
	walk(reflect.TypeFor[Config](), "")
	return out
}

// defaultEngineParallel is the engine's slot count when the engine cannot
// say it and SOUS_ENGINE_PARALLEL is auto: Ollama's OLLAMA_NUM_PARALLEL
// default on a GPU with room.
const defaultEngineParallel = 4

// engineParallel is SOUS_ENGINE_PARALLEL: 0 for auto (ask the engine), or
// the slots it was set to.
func (c Config) engineParallel() (int, error) {
	if c.EngineParallel == "auto" || c.EngineParallel == "" {
		return 0, nil
	}
	n, err := strconv.Atoi(c.EngineParallel)
	if err != nil || n < 1 || n > 4096 {
		return 0, bad("SOUS_ENGINE_PARALLEL", "must be auto (ask the engine, else %d) or the engine's parallel slots, 1 to 4096; got %q", defaultEngineParallel, c.EngineParallel)
	}
	return n, nil
}

// fixedParallel is the slot count the sizer starts with: the configured
// one, or the default until the engine says otherwise.
func (c Config) fixedParallel() int {
	if n, _ := c.engineParallel(); n > 0 {
		return n
	}
	return max(defaultEngineParallel, c.BatchMin)
}

// maxWait is how long a request may wait in the worker for a slot before
// it goes back to the queue: half of what consumer_timeout leaves after one
// engine call and its pause, the other half being the margin for
// settlement. 0 (no limit) without a consumer_timeout to respect (Service
// Bus renews its locks).
func (c Config) maxWait() time.Duration {
	if c.Broker != "rabbitmq" || c.AMQPConsumerTimeout <= 0 {
		return 0
	}
	return max(time.Millisecond, (c.AMQPConsumerTimeout-worker.HoldBound(0, c.EngineTimeout, c.RetryBackoffMax, c.BatchWait))/2)
}

func (c Config) sizingConfig() sizing.Config {
	return sizing.Config{
		Min:             c.BatchMin,
		Max:             c.BatchMax,
		ReserveBytes:    c.GPUReserveBytes,
		BytesPerItem:    c.BatchItemBytes,
		ContextLength:   c.ModelContextLength,
		KVBytesPerToken: c.KVBytesPerToken,
		EngineParallel:  c.fixedParallel(),
		GrowthStep:      c.BatchGrowthStep,
	}
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

// laneDeadLetterQueue is the dead-letter queue of a lane's requests:
// SOUS_DEAD_LETTER_QUEUE when set (every lane shares it), else the lane's
// queue + ".dlq".
func (c Config) laneDeadLetterQueue(l lanes.Lane) string {
	if c.deadLetterSet {
		return c.DeadLetterQueue
	}
	return l.Queue + ".dlq"
}
