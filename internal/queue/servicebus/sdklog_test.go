package servicebus

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/messaging/azservicebus"

	"github.com/sous-run/sous/internal/secret"
)

// closedPort is a loopback port nothing listens on.
func closedPort(t *testing.T) int {
	t.Helper()
	// A socket bound and never listening: connections to its port are
	// refused, and no other test or process can take the port while the
	// test runs (a listener closed at once would free it for anyone).
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	return sa.(*syscall.SockaddrInet4).Port
}

// An unreachable namespace: the real SDK retries each call on its own and
// said why only to azcore's log, so the worker logged nothing while Receive
// waited, and /readyz said only "context deadline exceeded". Each failed
// attempt is now logged at WARN with its cause, and Ready names the cause.
//
// Not parallel: azcore's log listener is one per process, and it tells
// every open driver of every failed SDK attempt (a worker has one driver).
// Beside the peer tests, Ready named whatever failed last in any of them
// (CI saw "EOF" from a peer connection instead of this test's refusal).
func TestUnreachableNamespaceIsLogged(t *testing.T) {
	port := closedPort(t)
	const key = "unreachable-test-key"
	cs := fmt.Sprintf("Endpoint=sb://127.0.0.1:%d;SharedAccessKeyName=k;SharedAccessKey=%s;UseDevelopmentEmulator=true", port, key)
	logs := &syncBuffer{}
	d, err := New(context.Background(), Config{
		ConnectionString: secret.Value(cs), Queue: "requests", LockRenewInterval: -1,
		clientOptions: &azservicebus.ClientOptions{RetryOptions: azservicebus.RetryOptions{MaxRetries: 2, RetryDelay: 300 * time.Millisecond, MaxRetryDelay: 300 * time.Millisecond}},
	}, slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelWarn})))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = d.Close(context.Background()) })

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := d.Receive(ctx, 1); err == nil || errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Receive = %v, want the SDK's error after its retries", err)
	}
	cause := fmt.Sprintf("127.0.0.1:%d", port)
	failed := 0
	for line := range strings.SplitSeq(logs.String(), "\n") {
		if strings.Contains(line, `"level":"WARN"`) && strings.Contains(line, cause) && strings.Contains(line, "refused") {
			failed++
		}
	}
	if failed < 3 {
		t.Errorf("%d WARN lines naming the refused connection, want one per attempt (3):\n%s", failed, logs)
	}

	rctx, rcancel := context.WithTimeout(context.Background(), 100*time.Millisecond) // ends while the SDK waits to retry
	defer rcancel()
	if err := d.Ready(rctx); err == nil || !strings.Contains(err.Error(), "refused") {
		t.Errorf("Ready = %v, want the cause", err)
	}
	if strings.Contains(logs.String(), key) {
		t.Errorf("the key leaked into the log:\n%s", logs)
	}
}

func TestParseSDKFailure(t *testing.T) {
	t.Parallel()
	tests := []struct {
		msg  string
		want sdkFailure
		ok   bool
	}{
		{"(receiveMessages.getlinks) Retry attempt 0 returned retryable error: dial tcp 127.0.0.1:1: connect: connection refused",
			sdkFailure{"receiveMessages.getlinks", 1, true, "dial tcp 127.0.0.1:1: connect: connection refused"}, true},
		{"[c:1, l:1, r:name] (completeMessage) Retry attempt 2 returned non-retryable error: *Error{Code: lock lost}",
			sdkFailure{"completeMessage", 3, false, "*Error{Code: lock lost}"}, true},
		{"(receiveMessages.getlinks) Retry attempt 1 sleeping for 3.7s", sdkFailure{}, false},
		{"(peekMessages) Retry attempt 1 was cancelled, stopping: context deadline exceeded", sdkFailure{}, false},
		{"Received 0/1 messages", sdkFailure{}, false},
	}
	for _, tt := range tests {
		got, ok := parseSDKFailure(tt.msg)
		if ok != tt.ok || got != tt.want {
			t.Errorf("parseSDKFailure(%q) = %+v, %v; want %+v, %v", tt.msg, got, ok, tt.want, tt.ok)
		}
	}
}
