package integration

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	tcrabbit "github.com/testcontainers/testcontainers-go/modules/rabbitmq"
)

// ensureBroker finds the broker the tests use: RABBITMQ_URL when set; else
// the local broker on 127.0.0.1:5672 when it answers; else, where a Docker
// engine answers, a RabbitMQ container started with testcontainers-go.
func ensureBroker(ctx context.Context) (url string, stop func(), err error) {
	if u := os.Getenv("RABBITMQ_URL"); u != "" {
		return u, func() {}, nil
	}
	const local = "amqp://guest:guest@127.0.0.1:5672/"
	if c, err := net.DialTimeout("tcp", "127.0.0.1:5672", time.Second); err == nil {
		c.Close()
		return local, func() {}, nil
	}
	if !dockerAnswers() {
		return "", nil, errors.New("no RabbitMQ: nothing answers on 127.0.0.1:5672, RABBITMQ_URL is unset and no Docker engine answers; " +
			"start one with `rabbitmq-server -detached` (or `make rabbitmq`)")
	}
	c, err := tcrabbit.Run(ctx, "rabbitmq:3.13-management-alpine")
	if err != nil {
		return "", nil, fmt.Errorf("start a RabbitMQ container: %w", err)
	}
	u, err := c.AmqpURL(ctx)
	if err != nil {
		_ = c.Terminate(context.Background())
		return "", nil, err
	}
	return u, func() { _ = c.Terminate(context.Background()) }, nil
}

func dockerAnswers() bool {
	sock := "/var/run/docker.sock"
	if h := os.Getenv("DOCKER_HOST"); h != "" {
		return true
	}
	c, err := net.DialTimeout("unix", sock, time.Second)
	if err != nil {
		return false
	}
	c.Close()
	return true
}
