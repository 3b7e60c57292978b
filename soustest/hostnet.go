package soustest

import (
	"context"
	"fmt"
	"net/http"
	"time"

	"github.com/docker/docker/api/types/container"
	"github.com/testcontainers/testcontainers-go"
	"github.com/testcontainers/testcontainers-go/log"
	"github.com/testcontainers/testcontainers-go/wait"
)

// runOnHostNetwork is testcontainers.GenericContainer for a container in the
// host's network namespace. GenericContainer's provider attaches every
// container to a default network, and on an engine without the "bridge"
// network (dockerd --bridge=none) it creates a bridge, reaper_default, for
// that; a host-network container cannot join it and fails to start. A
// provider whose default network is "host" creates nothing and attaches the
// container the way `docker run --network host` does.
func runOnHostNetwork(ctx context.Context, req testcontainers.GenericContainerRequest) (testcontainers.Container, error) {
	logger := req.Logger
	if logger == nil {
		logger = log.Default()
	}
	//lint:ignore SA1019 the one way to give GenericContainer's provider a default network
	p, err := testcontainers.NewDockerProvider(testcontainers.WithLogger(logger), testcontainers.DefaultNetwork("host"))
	if err != nil {
		return nil, fmt.Errorf("docker provider: %w", err)
	}
	defer p.Close()
	modify := req.HostConfigModifier
	req.HostConfigModifier = func(hc *container.HostConfig) {
		if modify != nil {
			modify(hc)
		}
		hc.NetworkMode = "host"
	}
	c, err := p.CreateContainer(ctx, req.ContainerRequest)
	if err != nil {
		return c, fmt.Errorf("create container: %w", err)
	}
	if err := c.Start(ctx); err != nil {
		return c, fmt.Errorf("start container: %w", err)
	}
	return c, nil
}

// readyzOnLoopback waits until GET url (the worker's /readyz on 127.0.0.1)
// answers 200. On the host's network the worker is on loopback, whatever
// testcontainers infers for Host (the gateway's address when the tests
// themselves run in a container), so wait.ForHTTP cannot be used.
type readyzOnLoopback struct {
	url     string
	timeout time.Duration
}

func (r readyzOnLoopback) WaitUntilReady(ctx context.Context, target wait.StrategyTarget) error {
	ctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	client := &http.Client{Timeout: 5 * time.Second}
	defer client.CloseIdleConnections()
	for {
		st, err := target.State(ctx)
		if err == nil && !st.Running {
			return fmt.Errorf("the container exited (code %d) before %s answered 200", st.ExitCode, r.url)
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, r.url, nil)
		if err != nil {
			return err
		}
		if resp, err := client.Do(req); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s did not answer 200 within %s: %w", r.url, r.timeout, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}
