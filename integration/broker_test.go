package integration

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/sous-run/sous/integration/containertest"
)

// brokerEnv forces where the suite's broker comes from: "testcontainers"
// starts a RabbitMQ container even when a local broker answers, so that
// the end-to-end checks run on the testcontainers path too (make test does).
const brokerEnv = "SOUS_IT_BROKER"

// ensureBroker finds the broker the tests use: RABBITMQ_URL when set; else
// the local broker on 127.0.0.1:5672 when it answers; else, where a Docker
// engine answers, a RabbitMQ container started with testcontainers-go from
// the image scripts/images.sh builds out of Debian's rabbitmq-server.
func ensureBroker(ctx context.Context) (url string, stop func(), err error) {
	force := os.Getenv(brokerEnv)
	switch force {
	case "", "testcontainers":
	default:
		return "", nil, fmt.Errorf("%s=%q: want testcontainers or nothing", brokerEnv, force)
	}
	if u := os.Getenv("RABBITMQ_URL"); u != "" && force == "" {
		return u, func() {}, nil
	}
	const local = "amqp://guest:guest@127.0.0.1:5672/"
	if c, err := net.DialTimeout("tcp", "127.0.0.1:5672", time.Second); err == nil && force == "" {
		c.Close()
		return local, func() {}, nil
	}
	if err := containertest.Init(ctx); err != nil {
		return "", nil, err
	}
	if why := containertest.Unavailable(); why != "" {
		if force != "" {
			return "", nil, fmt.Errorf("%s=testcontainers, but %s", brokerEnv, why)
		}
		return "", nil, errors.New("no RabbitMQ: nothing answers on 127.0.0.1:5672, RABBITMQ_URL is unset and " + why +
			"; start a broker with `rabbitmq-server -detached` (or `make rabbitmq`)")
	}
	u, stop, err := containertest.StartRabbitMQ(ctx, nil)
	if err != nil {
		stop()
		return "", nil, err
	}
	fmt.Fprintln(os.Stderr, "integration: RabbitMQ in a container (testcontainers-go) at", u)
	return u, stop, nil
}
