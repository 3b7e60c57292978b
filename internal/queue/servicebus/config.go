package servicebus

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/messaging/azservicebus"

	"github.com/sous-run/sous/internal/secret"
)

// Defaults for Config's zero values.
const (
	DefaultLockRenewInterval = 20 * time.Second
	DefaultMaxSenders        = 64
)

// maxReceive is the most messages one ReceiveMessages call may ask for (the
// SDK's link buffer).
const maxReceive = 5000

// Config configures a Driver. Only cmd/worker reads the environment; the
// variable named on each field is where it comes from there.
type Config struct {
	// ConnectionString is a Service Bus connection string,
	// "Endpoint=sb://<ns>.servicebus.windows.net/;SharedAccessKeyName=...;SharedAccessKey=...".
	// Env SOUS_SERVICEBUS_CONNECTION_STRING. One of ConnectionString and
	// Namespace is required; ConnectionString wins when both are set.
	ConnectionString secret.Value

	// Namespace is the fully qualified namespace
	// ("<ns>.servicebus.windows.net"), used with azidentity's
	// DefaultAzureCredential (workload identity on AKS, managed identity,
	// az login). Env SOUS_SERVICEBUS_NAMESPACE.
	Namespace string

	// Credential replaces DefaultAzureCredential when Namespace is used.
	// Optional; not read from the environment.
	Credential azcore.TokenCredential

	// Queue is the queue the driver receives from. Env SOUS_QUEUE. Required.
	Queue string

	// DeadLetterQueue chooses what a DeadLetter settlement does. Empty (the
	// default): Service Bus's DeadLetterMessage moves the message to the
	// queue's own dead-letter sub-queue, "<Queue>/$DeadLetterQueue", with
	// DeadLetterReason, DeadLetterErrorDescription and the
	// x-sous-dead-letter-* application properties. A queue name: the message
	// is copied to that queue with the x-sous-* properties and then
	// completed; this is at least once (a lock lost between the two steps
	// leaves a second copy after redelivery). Env
	// SOUS_SERVICEBUS_DEAD_LETTER_QUEUE.
	DeadLetterQueue string

	// LockRenewInterval is how often the lock of a held (received, not yet
	// settled) delivery is renewed; a renewal also happens at half the
	// remaining lock time when that is sooner. Zero means
	// DefaultLockRenewInterval (Service Bus's default lock is 60s); negative
	// disables renewal. Env SOUS_SERVICEBUS_LOCK_RENEW_INTERVAL.
	LockRenewInterval time.Duration

	// MaxSenders bounds the cache of senders, one per destination queue; the
	// least recently used one is closed beyond it. Zero means
	// DefaultMaxSenders. Env SOUS_SERVICEBUS_MAX_SENDERS.
	MaxSenders int

	// clientOptions lets tests shorten the SDK's retries.
	clientOptions *azservicebus.ClientOptions
}

func (c Config) withDefaults() Config {
	if c.LockRenewInterval == 0 {
		c.LockRenewInterval = DefaultLockRenewInterval
	}
	if c.MaxSenders == 0 {
		c.MaxSenders = DefaultMaxSenders
	}
	return c
}

// validate reports the first invalid field, naming its environment
// variable. It never includes the connection string.
func (c Config) validate() error {
	switch {
	case c.ConnectionString.IsZero() && c.Namespace == "":
		return errors.New("servicebus: SOUS_SERVICEBUS_CONNECTION_STRING or SOUS_SERVICEBUS_NAMESPACE must be set")
	case c.ConnectionString.IsZero() && (strings.Contains(c.Namespace, "://") || !strings.Contains(c.Namespace, ".")):
		return fmt.Errorf("servicebus: SOUS_SERVICEBUS_NAMESPACE %q must be a fully qualified host name such as myns.servicebus.windows.net", c.Namespace)
	case c.Queue == "":
		return errors.New("servicebus: SOUS_QUEUE must be set")
	case c.DeadLetterQueue == c.Queue:
		return fmt.Errorf("servicebus: SOUS_SERVICEBUS_DEAD_LETTER_QUEUE must differ from SOUS_QUEUE (%q)", c.Queue)
	case c.MaxSenders < 0:
		return fmt.Errorf("servicebus: SOUS_SERVICEBUS_MAX_SENDERS must be positive, got %d", c.MaxSenders)
	}
	return nil
}
