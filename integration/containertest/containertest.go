// Package containertest is what the container tests share: whether a Docker
// engine answers, the images `make images` builds (scripts/images.sh), and a
// RabbitMQ container, built here from Debian's rabbitmq-server, on its own
// loopback ports. It is test support, imported only by tests.
//
// Containers use the host's network (the test engine has no bridge: see
// scripts/ensure-docker.sh), so everything is reached on 127.0.0.1. Ryuk,
// testcontainers' reaper, cannot be pulled here: Init turns it off, and
// every container is terminated in t.Cleanup instead.
//
// Concurrency: Init runs once, from TestMain, before the tests; the rest is
// safe for concurrent use.
package containertest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/docker/docker/api/types/container"
	"github.com/testcontainers/testcontainers-go"
	tclog "github.com/testcontainers/testcontainers-go/log"
	"github.com/testcontainers/testcontainers-go/wait"
)

// The images scripts/images.sh builds.
const (
	WorkerImage       = "sous-worker:dev"
	WorkerOllamaImage = "sous-worker-ollama:dev"
	RabbitMQImage     = "sous-standin/rabbitmq:bookworm"
)

// unavailable says why the container tests cannot run; empty when they can.
var unavailable string

// Init prepares the container tests; call it from TestMain. It turns Ryuk
// off, checks that a Docker engine answers, and runs scripts/images.sh
// (which rebuilds only what changed), unless SOUS_SKIP_IMAGE_BUILD=1 says
// `make images` just did. With no engine it returns nil and Require skips
// (or fails, in CI); it returns an error when the engine answers but the
// images do not build.
func Init(ctx context.Context) error {
	// testcontainers reads its configuration once, on first use.
	if err := os.Setenv("TESTCONTAINERS_RYUK_DISABLED", "true"); err != nil {
		return err
	}
	// Every container here is on the host's network, so it is on loopback.
	// Without this, testcontainers running inside a container (/.dockerenv)
	// would reach containers through the default gateway's address.
	if err := os.Setenv("TESTCONTAINERS_HOST_OVERRIDE", "127.0.0.1"); err != nil {
		return err
	}
	if err := ping(ctx); err != nil {
		unavailable = fmt.Sprintf("no Docker engine answers (%v); `scripts/ensure-docker.sh` starts one", err)
		return nil
	}
	if os.Getenv("SOUS_SKIP_IMAGE_BUILD") == "1" && imagesPresent(ctx) {
		return nil
	}
	root, err := repoRoot()
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, filepath.Join(root, "scripts", "images.sh"))
	cmd.Dir = root
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("build the images (scripts/images.sh): %w", err)
	}
	return nil
}

// Require skips tb, with one line saying why, when Init found no Docker
// engine; in CI (CI=true) it fails tb instead: CI must run these tests.
func Require(tb testing.TB) {
	tb.Helper()
	if unavailable == "" {
		return
	}
	if os.Getenv("CI") == "true" {
		tb.Fatalf("CI=true and %s", unavailable)
	}
	tb.Skip(unavailable)
}

// Unavailable says why the container tests cannot run; empty when they can.
func Unavailable() string { return unavailable }

// ping asks the engine at DOCKER_HOST (default unix:///var/run/docker.sock)
// for /_ping. testcontainers' own client panics when it finds no engine, so
// this check comes first and uses plain HTTP.
func ping(ctx context.Context) error {
	host := os.Getenv("DOCKER_HOST")
	if host == "" {
		host = "unix:///var/run/docker.sock"
	}
	u, err := url.Parse(host)
	if err != nil {
		return fmt.Errorf("DOCKER_HOST=%s: %w", host, err)
	}
	base := "http://docker"
	var d net.Dialer
	dial := d.DialContext
	switch u.Scheme {
	case "unix":
		dial = func(ctx context.Context, _, _ string) (net.Conn, error) { return d.DialContext(ctx, "unix", u.Path) }
	case "tcp":
		base = "http://" + u.Host
	default:
		return fmt.Errorf("DOCKER_HOST=%s: only unix:// and tcp:// engines are checked", host)
	}
	client := &http.Client{Transport: &http.Transport{DialContext: dial}, Timeout: 10 * time.Second}
	defer client.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/_ping", nil)
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("%s: %w", host, err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: /_ping answered %s", host, resp.Status)
	}
	return nil
}

func imagesPresent(ctx context.Context) bool {
	cli, err := testcontainers.NewDockerClientWithOpts(ctx)
	if err != nil {
		return false
	}
	defer cli.Close()
	for _, img := range []string{WorkerImage, WorkerOllamaImage, RabbitMQImage} {
		if _, err := cli.ImageInspect(ctx, img); err != nil {
			return false
		}
	}
	return true
}

func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory")
		}
		dir = parent
	}
}

// HostNetwork is the container option all containers here take.
func HostNetwork(hc *container.HostConfig) { hc.NetworkMode = "host" }

// Logger sends testcontainers' lines to tb's log.
func Logger(tb testing.TB) testcontainers.LoggerOption {
	return testcontainers.WithLogger(tclog.TestLogger(tb))
}

// RabbitMQ starts a RabbitMQ node in a container on free loopback ports
// (AMQP, Erlang distribution and its own epmd, so that it never meets the
// machine's broker), waits until it accepts connections, terminates it in
// tb.Cleanup and returns its AMQP URL (guest/guest, which RabbitMQ allows
// from loopback only: that is where the tests connect from).
func RabbitMQ(tb testing.TB) string {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	url, stop, err := StartRabbitMQ(ctx, tclog.TestLogger(tb))
	tb.Cleanup(stop)
	if err != nil {
		tb.Fatal(err)
	}
	return url
}

// StartRabbitMQ is RabbitMQ for TestMain: the caller calls stop (also after
// an error). log receives testcontainers' lines (nil: its default).
func StartRabbitMQ(ctx context.Context, log tclog.Logger) (url string, stop func(), err error) {
	ports, err := freePorts(3)
	if err != nil {
		return "", func() {}, err
	}
	amqpPort, distPort, epmdPort := ports[0], ports[1], ports[2]
	req := testcontainers.GenericContainerRequest{
		ContainerRequest: testcontainers.ContainerRequest{
			Image: RabbitMQImage,
			Env: map[string]string{
				"RABBITMQ_NODENAME":        "sous-tc-" + strconv.Itoa(amqpPort) + "@localhost",
				"RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
				"RABBITMQ_NODE_PORT":       strconv.Itoa(amqpPort),
				"RABBITMQ_DIST_PORT":       strconv.Itoa(distPort),
				"ERL_EPMD_PORT":            strconv.Itoa(epmdPort),
				"ERL_EPMD_ADDRESS":         "127.0.0.1",
			},
			HostConfigModifier: HostNetwork,
			WaitingFor:         wait.ForLog("Server startup complete").WithStartupTimeout(3 * time.Minute),
		},
		Started: true,
	}
	if log != nil {
		req.Logger = log
	}
	c, err := runOnHostNetwork(ctx, req)
	stop = func() {
		if err := testcontainers.TerminateContainer(c); err != nil {
			fmt.Fprintln(os.Stderr, "containertest: terminate RabbitMQ:", err)
		}
	}
	if err != nil {
		return "", stop, fmt.Errorf("start RabbitMQ from %s (built by scripts/images.sh): %w", RabbitMQImage, err)
	}
	return fmt.Sprintf("amqp://guest:guest@127.0.0.1:%d/", amqpPort), stop, nil
}

func freePorts(n int) ([]int, error) {
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		defer l.Close() // held until all are picked, so they differ
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// runOnHostNetwork is testcontainers.GenericContainer for a container in the
// host's network namespace, with a provider whose default network is "host"
// (soustest's runOnHostNetwork says why GenericContainer's own provider
// cannot start one on an engine without a bridge).
func runOnHostNetwork(ctx context.Context, req testcontainers.GenericContainerRequest) (testcontainers.Container, error) {
	logger := req.Logger
	if logger == nil {
		logger = tclog.Default()
	}
	//lint:ignore SA1019 the one way to give the provider a default network
	p, err := testcontainers.NewDockerProvider(testcontainers.WithLogger(logger), testcontainers.DefaultNetwork("host"))
	if err != nil {
		return nil, fmt.Errorf("docker provider: %w", err)
	}
	defer p.Close()
	c, err := p.CreateContainer(ctx, req.ContainerRequest)
	if err != nil {
		return c, fmt.Errorf("create container: %w", err)
	}
	if err := c.Start(ctx); err != nil {
		return c, fmt.Errorf("start container: %w", err)
	}
	return c, nil
}
