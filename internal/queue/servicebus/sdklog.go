package servicebus

import (
	"strconv"
	"strings"
	"sync"

	azlog "github.com/Azure/azure-sdk-for-go/sdk/azcore/log"
	"github.com/Azure/azure-sdk-for-go/sdk/messaging/azservicebus"

	"github.com/sous-run/sous/internal/secret"
)

// The SDK retries a failed call (connecting, receiving, settling, sending)
// on its own, several times over tens of seconds, and says why only through
// azcore's log: without it an unreachable namespace logs nothing while
// Receive waits. sdkLog is the one azcore log listener of the process: it
// picks the SDK's reports of a failed attempt and logs each, with its
// cause, on the logger of every open Driver (a process has one).
var sdkLog struct {
	once    sync.Once
	mu      sync.Mutex // held while forwarding, so Close ends the forwarding
	drivers map[*Driver]struct{}
}

// watchSDK starts forwarding the SDK's failed attempts to d's log, and
// installs the listener on first use. It replaces any azcore log listener
// set before: sous sets none.
func watchSDK(d *Driver) {
	sdkLog.once.Do(func() {
		azlog.SetEvents(azservicebus.EventReceiver, azservicebus.EventSender)
		azlog.SetListener(forwardSDKLog)
	})
	sdkLog.mu.Lock()
	defer sdkLog.mu.Unlock()
	if sdkLog.drivers == nil {
		sdkLog.drivers = map[*Driver]struct{}{}
	}
	sdkLog.drivers[d] = struct{}{}
}

// unwatchSDK stops forwarding to d; no forward to d is in progress when it
// returns.
func unwatchSDK(d *Driver) {
	sdkLog.mu.Lock()
	defer sdkLog.mu.Unlock()
	delete(sdkLog.drivers, d)
}

func forwardSDKLog(_ azlog.Event, msg string) {
	f, ok := parseSDKFailure(msg)
	if !ok {
		return
	}
	sdkLog.mu.Lock()
	defer sdkLog.mu.Unlock()
	for d := range sdkLog.drivers {
		d.sdkFailed(f)
	}
}

// sdkFailure is one failed attempt as the SDK reports it:
// "[prefix ](operation) Retry attempt N returned retryable error: cause".
type sdkFailure struct {
	operation string
	attempt   int // 1-based
	retrying  bool
	cause     string
}

func parseSDKFailure(msg string) (sdkFailure, bool) {
	head, cause, ok := strings.Cut(msg, " error: ")
	if !ok {
		return sdkFailure{}, false
	}
	head, kind, ok := cutLast(head, " returned ")
	if !ok || (kind != "retryable" && kind != "non-retryable") {
		return sdkFailure{}, false
	}
	head, n, ok := cutLast(head, " Retry attempt ")
	attempt, err := strconv.Atoi(n)
	if !ok || err != nil {
		return sdkFailure{}, false
	}
	op := head
	if i := strings.LastIndex(head, "("); i >= 0 && strings.HasSuffix(head, ")") {
		op = head[i+1 : len(head)-1]
	}
	return sdkFailure{operation: op, attempt: attempt + 1, retrying: kind == "retryable", cause: cause}, true
}

func cutLast(s, sep string) (before, after string, ok bool) {
	i := strings.LastIndex(s, sep)
	if i < 0 {
		return s, "", false
	}
	return s[:i], s[i+len(sep):], true
}

// sdkFailed logs one failed attempt and keeps its cause for Ready.
func (d *Driver) sdkFailed(f sdkFailure) {
	cause := secret.Scrub(f.cause, connSecrets(d.cfg.ConnectionString)...)
	d.lastErr.Store(&cause)
	d.log.Warn("servicebus call failed", "operation", f.operation, "attempt", f.attempt, "sdk_retries", f.retrying, "err", cause)
}
