package reliability

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/rs/zerolog"
)

// toxic is a TCP proxy between the worker and the broker, run in-process on
// loopback, that the test poisons on demand.
type toxic struct {
	t     testing.TB
	proxy *toxiproxy.Proxy
}

func newToxic(t testing.TB, upstream string) *toxic {
	t.Helper()
	srv := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(nil), zerolog.Nop())
	p := toxiproxy.NewProxy(srv, "amqp-"+fmt.Sprint(seq.Add(1)), "127.0.0.1:0", upstream)
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Stop)
	return &toxic{t: t, proxy: p}
}

// url is the broker URL through the proxy.
func (x *toxic) url() string { return "amqp://guest:guest@" + x.proxy.Listen + "/" }

// add poisons both directions with a toxic of kind and attributes.
func (x *toxic) add(kind, attrs string) {
	x.t.Helper()
	for _, stream := range []string{"upstream", "downstream"} {
		body := fmt.Sprintf(`{"name":%q,"type":%q,"stream":%q,"attributes":%s}`, kind+"_"+stream, kind, stream, attrs)
		if _, err := x.proxy.Toxics.AddToxicJson(strings.NewReader(body)); err != nil {
			x.t.Fatalf("add toxic %s: %v", body, err)
		}
	}
}

func (x *toxic) remove(kind string) {
	x.t.Helper()
	for _, stream := range []string{"upstream", "downstream"} {
		if err := x.proxy.Toxics.RemoveToxic(context.Background(), kind+"_"+stream); err != nil {
			x.t.Fatalf("remove toxic %s: %v", kind, err)
		}
	}
}

// TestNetworkFaults poisons the connection between the worker and the
// broker while a batch is in flight: the worker reconnects, resumes, and
// every request gets a result (at least once).
func TestNetworkFaults(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		// fault poisons the proxy and returns once the fault has bitten;
		// heal undoes it.
		toxic, attrs string
		// hold is how long the fault stays after the worker noticed it.
		hold time.Duration
		// noticed: whether the worker must lose its connection.
		noticed bool
	}{
		// An RST on every segment: the connection dies at once, and so
		// does every reconnect until the fault is removed.
		{name: "reset", toxic: "reset_peer", attrs: `{"timeout":0}`, hold: time.Second, noticed: true},
		// Every byte dropped, the connection left open: only the AMQP
		// heartbeat (10s, three missed) can tell.
		{name: "blackhole", toxic: "timeout", attrs: `{"timeout":0}`, hold: 0, noticed: true},
		// 300ms each way (jitter 100ms): slow but healthy.
		{name: "latency", toxic: "latency", attrs: `{"latency":300,"jitter":100}`, hold: 5 * time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			eng := newFakeEngine(t)
			eng.setDelay(200 * time.Millisecond)
			x := newToxic(t, strings.TrimPrefix(strings.TrimSuffix(sharedURL, "/"), "amqp://guest:guest@"))
			q := names(t)
			w := startWorker(t, workerOpts{queue: q, brokerURL: x.url(), engineURL: eng.URL()})
			l := watch(t, sharedURL, q)
			c := newClient(t, sharedURL)
			const n = 200
			ids := c.publishRequests(q, "n", n)
			waitUntil(t, 60*time.Second, "a batch in flight after some results", func() bool {
				return l.settled(ids) >= 20 && eng.inflight.Load() > 0
			})
			began := time.Now()
			x.add(tt.toxic, tt.attrs)
			if tt.noticed {
				waitUntil(t, 60*time.Second, "the worker to notice the fault", func() bool { return w.Get("/readyz") != 200 })
				figure(t, "detect_s", fmt.Sprintf("%.1f", time.Since(began).Seconds()))
			}
			time.Sleep(tt.hold)
			healed := time.Now()
			x.remove(tt.toxic)
			if tt.noticed {
				w.WaitProbe(t, "/readyz", 60*time.Second)
				figure(t, "reconnect_after_heal_s", fmt.Sprintf("%.1f", time.Since(healed).Seconds()))
			}
			tl := l.waitSettled(t, ids, 120*time.Second)
			checkNoLoss(t, tl)
			if tl.dead > 0 {
				t.Errorf("%d requests dead-lettered by a network fault", tl.dead)
			}
			figure(t, "tally", tl)
			if tt.noticed && !strings.Contains(w.Logs(), "broker reconnected") {
				t.Errorf("the worker never logged a reconnect")
			}
		})
	}
}
