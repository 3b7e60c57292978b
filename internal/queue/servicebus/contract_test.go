package servicebus

import (
	"fmt"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/Azure/azure-sdk-for-go/sdk/messaging/azservicebus"

	"github.com/sous-run/sous/internal/queue/queuetest"
	"github.com/sous-run/sous/internal/queue/servicebus/sbpeer"
	"github.com/sous-run/sous/internal/secret"
)

// TestContract runs the queue contract suite on the real SDK against one
// sbpeer (a protocol test double, not an emulator), a queue per test.
func TestContract(t *testing.T) {
	t.Parallel()
	p := sbpeer.Start(t, sbpeer.Options{})
	var seq atomic.Int64
	open := func(t *testing.T, name string) queuetest.Driver {
		return newPeerDriver(t, Config{
			ConnectionString: secret.Value(p.ConnectionString()),
			Queue:            name,
			clientOptions:    &azservicebus.ClientOptions{RetryOptions: peerRetries},
		})
	}
	queuetest.Run(t, queuetest.Harness{
		Queue: func(t *testing.T) string {
			return fmt.Sprintf("contract-%s-%d", strings.ReplaceAll(t.Name(), "/", "-"), seq.Add(1))
		},
		// Service Bus has no push prefetch: Receive asks for what it wants.
		Open: func(t *testing.T, name string, _ int) queuetest.Driver { return open(t, name) },
		OpenDeadLetters: func(t *testing.T, name string) queuetest.Driver {
			return open(t, name+"/$DeadLetterQueue")
		},
	})
}
