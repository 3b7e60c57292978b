package scaler

import (
	"context"
	"fmt"

	"github.com/Azure/azure-sdk-for-go/sdk/azidentity"
	"github.com/Azure/azure-sdk-for-go/sdk/messaging/azservicebus/admin"

	"github.com/sous-run/sous/internal/secret"
)

// ServiceBusDepth reads queue depths with the Service Bus admin client:
// a queue's active messages, which count those locked by workers too.
// Workers do not report on Service Bus yet, so its queues are priced at
// the last cost seen or the prior.
type ServiceBusDepth struct {
	client *admin.Client
	secret secret.Value
}

// NewServiceBusDepth connects with a connection string, or else to
// namespace with azidentity's default credential (workload identity).
func NewServiceBusDepth(connectionString secret.Value, namespace string) (*ServiceBusDepth, error) {
	if !connectionString.IsZero() {
		c, err := admin.NewClientFromConnectionString(connectionString.Reveal(), nil)
		if err != nil {
			return nil, fmt.Errorf("SOUS_SERVICEBUS_CONNECTION_STRING is invalid: %s", secret.Scrub(err.Error(), connectionString))
		}
		return &ServiceBusDepth{client: c, secret: connectionString}, nil
	}
	cred, err := azidentity.NewDefaultAzureCredential(nil)
	if err != nil {
		return nil, fmt.Errorf("azure credential for SOUS_SERVICEBUS_NAMESPACE: %w", err)
	}
	c, err := admin.NewClient(namespace, cred, nil)
	if err != nil {
		return nil, fmt.Errorf("admin client for %q: %w", namespace, err)
	}
	return &ServiceBusDepth{client: c}, nil
}

// Depth implements Depth.
func (s *ServiceBusDepth) Depth(ctx context.Context, queue string) (int, bool, error) {
	resp, err := s.client.GetQueueRuntimeProperties(ctx, queue, nil)
	if err != nil {
		return 0, true, fmt.Errorf("queue %s: %s", queue, secret.Scrub(err.Error(), s.secret))
	}
	if resp == nil {
		return 0, true, fmt.Errorf("%w: %s", ErrNoQueue, queue)
	}
	return int(resp.ActiveMessageCount), true, nil
}
