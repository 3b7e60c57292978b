package soustest

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/docker/go-connections/nat"
	"github.com/testcontainers/testcontainers-go"
	"github.com/testcontainers/testcontainers-go/wait"
)

const (
	// httpPort is where the worker serves /healthz, /readyz and /metrics
	// (SOUS_HTTP_ADDR's default, :8080).
	httpPort = "8080/tcp"
	// defaultStartupTimeout bounds the wait for /readyz: an image that runs
	// its own engine loads the model first.
	defaultStartupTimeout = 3 * time.Minute
	// defaultQueue and defaultAMQPURL are the worker's own defaults
	// (SOUS_QUEUE, SOUS_AMQP_URL).
	defaultQueue   = "sous.requests"
	defaultAMQPURL = "amqp://guest:guest@localhost:5672/"
)

// Container is a running sous worker. Create it with Run.
type Container struct {
	testcontainers.Container
	httpURL   string
	queue     string
	clientURL string

	mu     sync.Mutex
	client *client // nil until the first Publish; closed by Terminate
}

// HTTPURL is the worker's HTTP server as the test process reaches it
// (http://host:port): /healthz, /readyz, /metrics.
func (c *Container) HTTPURL() string { return c.httpURL }

// Queue is the queue the worker consumes (SOUS_QUEUE).
func (c *Container) Queue() string { return c.queue }

// Terminate closes the broker connection the helpers opened, then stops and
// removes the container (the worker drains first: see docker stop).
func (c *Container) Terminate(ctx context.Context, opts ...testcontainers.TerminateOption) error {
	c.mu.Lock()
	cl := c.client
	c.client = nil
	c.mu.Unlock()
	if cl != nil {
		cl.close()
	}
	return c.Container.Terminate(ctx, opts...)
}

// Run starts the worker image img with the given options and returns once
// its /readyz answers 200. Options are this package's (With...) or any
// testcontainers.ContainerCustomizer, applied after them. On an error after
// the container was created, the returned *Container is not nil: terminate
// it (testcontainers.CleanupContainer does).
func Run(ctx context.Context, img string, opts ...testcontainers.ContainerCustomizer) (*Container, error) {
	s := settings{env: map[string]string{"SOUS_LOG_FORMAT": "json"}, startup: defaultStartupTimeout}
	for _, o := range opts {
		if so, ok := o.(Option); ok {
			if err := so(&s); err != nil {
				return nil, fmt.Errorf("soustest: %w", err)
			}
		}
	}
	port := nat.Port(httpPort)
	req := testcontainers.GenericContainerRequest{
		ContainerRequest: testcontainers.ContainerRequest{Image: img, ExposedPorts: []string{httpPort}},
		Started:          true,
	}
	if s.hostNetwork {
		if err := s.hostPorts(&port); err != nil {
			return nil, fmt.Errorf("soustest: %w", err)
		}
		req.ExposedPorts = nil
	}
	req.Env = s.env
	req.WaitingFor = wait.ForHTTP("/readyz").WithPort(port).WithStartupTimeout(s.startup)
	if s.hostNetwork {
		req.WaitingFor = readyzOnLoopback{url: "http://127.0.0.1:" + port.Port() + "/readyz", timeout: s.startup}
	}
	for _, o := range opts {
		if err := o.Customize(&req); err != nil {
			return nil, fmt.Errorf("soustest: %w", err)
		}
	}

	var ctr testcontainers.Container
	var err error
	if s.hostNetwork {
		ctr, err = runOnHostNetwork(ctx, req)
	} else {
		ctr, err = testcontainers.GenericContainer(ctx, req)
	}
	var c *Container
	if ctr != nil {
		c = &Container{Container: ctr, queue: s.get("SOUS_QUEUE", defaultQueue), clientURL: s.clientURL}
		if c.clientURL == "" {
			c.clientURL = s.get("SOUS_AMQP_URL", defaultAMQPURL)
		}
	}
	if err != nil {
		return c, fmt.Errorf("soustest: start %s: %w", img, err)
	}
	if s.hostNetwork {
		c.httpURL = "http://127.0.0.1:" + port.Port()
		return c, nil
	}
	host, err := ctr.Host(ctx)
	if err != nil {
		return c, fmt.Errorf("soustest: %w", err)
	}
	mapped, err := ctr.MappedPort(ctx, port)
	if err != nil {
		return c, fmt.Errorf("soustest: %w", err)
	}
	c.httpURL = "http://" + net.JoinHostPort(host, mapped.Port())
	return c, nil
}

// settings is what the options set.
type settings struct {
	env         map[string]string
	hostNetwork bool
	clientURL   string
	startup     time.Duration
}

func (s *settings) get(key, def string) string {
	if v, ok := s.env[key]; ok && v != "" {
		return v
	}
	return def
}

// hostPorts picks free loopback ports for what would collide on the host's
// network: the worker's HTTP server and, unless the engine URL is set, the
// engine an image like worker-ollama runs itself.
func (s *settings) hostPorts(port *nat.Port) error {
	addr, ok := s.env["SOUS_HTTP_ADDR"]
	if !ok {
		p, err := freePort()
		if err != nil {
			return err
		}
		addr = "127.0.0.1:" + strconv.Itoa(p)
		s.env["SOUS_HTTP_ADDR"] = addr
	}
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("SOUS_HTTP_ADDR %q: %w", addr, err)
	}
	*port = nat.Port(p + "/tcp")
	if _, ok := s.env["SOUS_ENGINE_URL"]; !ok {
		p, err := freePort()
		if err != nil {
			return err
		}
		s.env["OLLAMA_HOST"] = "127.0.0.1:" + strconv.Itoa(p)
		s.env["SOUS_ENGINE_URL"] = "http://127.0.0.1:" + strconv.Itoa(p)
	}
	return nil
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("pick a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// Option configures the worker container. It is a
// testcontainers.ContainerCustomizer, so it mixes with testcontainers'
// own options in Run.
type Option func(*settings) error

// Customize is a no-op: Run applies Options itself, before the others.
func (o Option) Customize(*testcontainers.GenericContainerRequest) error { return nil }

// WithSetting sets any of the worker's settings by its variable name, e.g.
// WithSetting("SOUS_BATCH_MAX", "8"). Names the worker does not read are
// refused, so a typo fails the test instead of being ignored.
func WithSetting(name, value string) Option {
	return func(s *settings) error {
		if !knownSetting(name) {
			return fmt.Errorf("WithSetting(%q): the worker reads no such variable; the known ones are listed in README.md's configuration table", name)
		}
		s.env[name] = value
		return nil
	}
}

func setting(name, value string) Option {
	return func(s *settings) error { s.env[name] = value; return nil }
}

// WithAMQPURL is the broker URL as the worker reaches it (SOUS_AMQP_URL).
// The helpers use it too, unless WithClientAMQPURL says otherwise.
func WithAMQPURL(url string) Option { return setting("SOUS_AMQP_URL", url) }

// WithClientAMQPURL is the broker URL as the test process reaches it, when
// that differs from the worker's (a broker on a Docker network, a mapped port).
func WithClientAMQPURL(url string) Option {
	return func(s *settings) error { s.clientURL = url; return nil }
}

// WithQueue is the queue the worker consumes (SOUS_QUEUE).
func WithQueue(name string) Option { return setting("SOUS_QUEUE", name) }

// WithResultsQueue is where results of requests without reply_to go (SOUS_RESULTS_QUEUE).
func WithResultsQueue(name string) Option { return setting("SOUS_RESULTS_QUEUE", name) }

// WithEngine is the engine kind, "ollama" or "openai" (SOUS_ENGINE).
func WithEngine(kind string) Option { return setting("SOUS_ENGINE", kind) }

// WithEngineURL is the engine as the worker reaches it (SOUS_ENGINE_URL).
func WithEngineURL(url string) Option { return setting("SOUS_ENGINE_URL", url) }

// WithModel is the model requests default to (SOUS_MODEL).
func WithModel(name string) Option { return setting("SOUS_MODEL", name) }

// WithBatchMax is the most requests in one batch (SOUS_BATCH_MAX).
func WithBatchMax(n int) Option { return setting("SOUS_BATCH_MAX", strconv.Itoa(n)) }

// WithBatchWait is how long a batch waits to fill (SOUS_BATCH_WAIT).
func WithBatchWait(d time.Duration) Option { return setting("SOUS_BATCH_WAIT", d.String()) }

// WithDrainTimeout is how long running batches may finish after SIGTERM (SOUS_DRAIN_TIMEOUT).
func WithDrainTimeout(d time.Duration) Option { return setting("SOUS_DRAIN_TIMEOUT", d.String()) }

// WithMaxNumPredict caps the tokens a request may ask for (SOUS_MAX_NUM_PREDICT).
func WithMaxNumPredict(n int) Option { return setting("SOUS_MAX_NUM_PREDICT", strconv.Itoa(n)) }

// WithLogLevel is debug, info, warn or error (SOUS_LOG_LEVEL).
func WithLogLevel(level string) Option { return setting("SOUS_LOG_LEVEL", level) }

// WithWorkerID names the worker in results and logs (SOUS_WORKER_ID).
func WithWorkerID(id string) Option { return setting("SOUS_WORKER_ID", id) }

// WithHostNetwork runs the container in the host's network namespace (no
// port mapping; for Docker engines without a bridge network). The worker's
// HTTP port and, when WithEngineURL is not given, the port of an engine the
// image runs itself (OLLAMA_HOST) are picked free on 127.0.0.1.
func WithHostNetwork() Option {
	return func(s *settings) error { s.hostNetwork = true; return nil }
}

// WithStartupTimeout bounds the wait for /readyz (default 3 minutes).
func WithStartupTimeout(d time.Duration) Option {
	return func(s *settings) error {
		if d <= 0 {
			return fmt.Errorf("WithStartupTimeout(%s): want a positive duration", d)
		}
		s.startup = d
		return nil
	}
}

// knownSetting reports whether the worker reads the variable name.
func knownSetting(name string) bool {
	for _, k := range strings.Fields(knownSettings) {
		if k == name {
			return true
		}
	}
	return false
}
