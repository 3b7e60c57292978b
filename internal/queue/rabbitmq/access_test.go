package rabbitmq_test

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/sous-run/sous/integration/itest"
	"github.com/sous-run/sous/internal/queue/rabbitmq"
	"github.com/sous-run/sous/internal/secret"
)

// userURL is the test broker's URL with another user and password.
func userURL(t *testing.T, user, password string) string {
	t.Helper()
	u := brokerURL()
	at := strings.LastIndex(u, "@")
	scheme := strings.Index(u, "://")
	if at < 0 || scheme < 0 {
		t.Fatalf("RABBITMQ_URL %q has no user", u)
	}
	return u[:scheme+3] + user + ":" + password + u[at:]
}

// TestAccessRefusedAtStart: a broker that refuses the credentials, the
// vhost or the queues at start is configuration, which retrying cannot fix:
// Open returns ErrAccessRefused at once instead of retrying the 403 every
// few seconds until its context ends.
func TestAccessRefusedAtStart(t *testing.T) {
	t.Parallel()
	const password = "right-password-4711"
	tests := []struct {
		name, password string
		perms          *itest.Permissions
	}{
		{"wrong password", "wrong-password-0815", &itest.Permissions{Configure: ".*", Write: ".*", Read: ".*"}},
		{"no access to the vhost", password, nil},
		{"may not declare the queue", password, &itest.Permissions{Configure: "^$", Write: ".*", Read: ".*"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			user := uniqueQueue(t) + "-user"
			itest.CreateUser(t, user, password, tt.perms)
			q := uniqueQueue(t)
			declared.Add(q, q+".dlq")
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			began := time.Now()
			d, err := rabbitmq.Open(ctx, rabbitmq.Config{
				URL: secret.Value(userURL(t, user, tt.password)), Queue: q, DeadLetterQueue: q + ".dlq", Declare: true, Consume: true,
			}, slog.New(slog.NewTextHandler(testLog{t}, nil)))
			if err == nil {
				d.Close()
				t.Fatal("Open succeeded")
			}
			if !errors.Is(err, rabbitmq.ErrAccessRefused) || ctx.Err() != nil {
				t.Fatalf("Open = %v after %v, want ErrAccessRefused at once", err, time.Since(began).Round(time.Millisecond))
			}
			if strings.Contains(err.Error(), tt.password) {
				t.Errorf("the password is in the error: %v", err)
			}
			t.Logf("Open = %v after %v", err, time.Since(began).Round(time.Millisecond))
		})
	}
}

// TestAccessRefusedAfterAGoodStartKeepsRetrying: once the driver ran, a
// refusal on reconnect may heal (a password being rotated), so the driver
// keeps trying, and comes back when the broker lets it in again.
func TestAccessRefusedAfterAGoodStartKeepsRetrying(t *testing.T) {
	t.Parallel()
	const password = "first-password-4711"
	user := uniqueQueue(t) + "-user"
	itest.CreateUser(t, user, password, &itest.Permissions{Configure: ".*", Write: ".*", Read: ".*"})
	q := uniqueQueue(t)
	name := "sous-test " + q
	logs := &syncBuffer{}
	d := openWithLog(t, rabbitmq.Config{
		URL: secret.Value(userURL(t, user, password)), Queue: q, DeadLetterQueue: q + ".dlq", Prefetch: 1, Consume: true,
		ConnectionName: name, ReconnectMin: 50 * time.Millisecond, ReconnectMax: 200 * time.Millisecond,
	}, slog.New(slog.NewTextHandler(logs, nil)))
	itest.SetPassword(t, user, "rotated-password-0815")
	itest.CloseConnections(t, name, 20*time.Second)
	itest.WaitUntil(t, 20*time.Second, "reconnects refused", func() bool {
		return strings.Count(logs.String(), "Exception (403)") >= 2
	})
	itest.SetPassword(t, user, password)
	itest.WaitUntil(t, 20*time.Second, "the driver back", func() bool { return d.Ready(context.Background()) == nil })
}

type testLog struct{ t *testing.T }

func (w testLog) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(b)))
	return len(b), nil
}
