package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/sous-run/sous/integration/ollamatest"
	"github.com/sous-run/sous/internal/gateway"
	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/inference/ollama"
	"github.com/sous-run/sous/internal/secret"
)

// startGateway runs the OpenAI-compatible gateway in this process on e's
// queue and returns its base URL.
func (e *env) startGateway(timeout time.Duration) string {
	e.b.Helper()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	br, err := gateway.OpenAMQP(ctx, gateway.AMQPConfig{URL: secret.Value(brokerURL), Queue: e.queue, ConnectionName: "bench-gateway"}, log)
	if err != nil {
		e.b.Fatal(err)
	}
	srv := httptest.NewServer(gateway.New(gateway.Config{Queue: e.queue, Model: e.model, Timeout: timeout, KeepAlive: time.Second, MaxOpen: 4096,
		MaxBodyBytes: 1 << 20, MaxNumPredict: 64}, br, log))
	e.b.Cleanup(func() { srv.Close(); _ = br.Close() })
	return srv.URL
}

// sousctlClient is what sousctl does, one request at a time: publish
// (persistent, mandatory, confirmed) with direct reply-to, wait for the
// result.
type sousctlClient struct {
	e       *env
	ch      *amqp.Channel
	replies <-chan amqp.Delivery
	n       int
}

func (e *env) sousctl() *sousctlClient {
	e.b.Helper()
	ch, err := e.conn.Channel()
	if err != nil {
		e.b.Fatal(err)
	}
	e.b.Cleanup(func() { ch.Close() })
	replies, err := ch.Consume("amq.rabbitmq.reply-to", "", true, false, false, false, nil)
	if err != nil {
		e.b.Fatal(err)
	}
	if err := ch.Confirm(false); err != nil {
		e.b.Fatal(err)
	}
	return &sousctlClient{e: e, ch: ch, replies: replies}
}

// roundTrip sends one request and returns its latency.
func (c *sousctlClient) roundTrip() time.Duration {
	c.n++
	id := fmt.Sprint("s", c.n)
	t0 := time.Now()
	conf, err := c.ch.PublishWithDeferredConfirmWithContext(context.Background(), "", c.e.queue, true, false, amqp.Publishing{
		ContentType: "application/json", DeliveryMode: amqp.Persistent, MessageId: id, CorrelationId: id,
		ReplyTo: "amq.rabbitmq.reply-to", Timestamp: time.Now(), Body: []byte(`{"prompt":"x","options":{"num_predict":4}}`)})
	if err != nil || !conf.Wait() {
		c.e.b.Fatalf("publish: %v", err)
	}
	for d := range c.replies {
		if d.CorrelationId == id {
			break
		}
	}
	return time.Since(t0)
}

func (e *env) sousctlRoundTrips(n int) []time.Duration {
	e.b.Helper()
	c := e.sousctl()
	lat := make([]time.Duration, 0, n)
	for range n {
		lat = append(lat, c.roundTrip())
	}
	return lat
}

// gatewayRoundTrip sends one completion through the gateway at url and
// returns its latency.
func (e *env) gatewayRoundTrip(url string) time.Duration {
	t0 := time.Now()
	resp, err := http.Post(url+"/v1/completions", "application/json", strings.NewReader(`{"prompt":"x","max_tokens":4}`))
	if err != nil {
		e.b.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		e.b.Fatalf("status %d", resp.StatusCode)
	}
	return time.Since(t0)
}

func (e *env) gatewayRoundTrips(url string, n int) []time.Duration {
	e.b.Helper()
	lat := make([]time.Duration, 0, n)
	for range n {
		lat = append(lat, e.gatewayRoundTrip(url))
	}
	return lat
}

func percentile(lat []time.Duration, q float64) float64 {
	s := append([]time.Duration(nil), lat...)
	sortDurations(s)
	return float64(s[min(len(s)-1, int(q*float64(len(s))))].Microseconds()) / 1000
}

func sortDurations(s []time.Duration) {
	for i := 1; i < len(s); i++ {
		for j := i; j > 0 && s[j] < s[j-1]; j-- {
			s[j], s[j-1] = s[j-1], s[j]
		}
	}
}

// BenchmarkGatewayAddedLatency: at low load (one request at a time, an
// engine that answers at once), the gateway's round trip over HTTP
// against sousctl's publish → direct reply-to round trip on the same
// worker and broker. The gateway design reports its own percentiles and
// the difference to sousctl's of the same run (added-p50-ms, added-p99-ms).
func BenchmarkGatewayAddedLatency(b *testing.B) {
	var base []time.Duration
	b.Run("design=sousctl", func(b *testing.B) {
		e := setup(b, "tiny", workload{})
		stop := e.startSous(instant{}, 1, nil)
		defer stop()
		e.sousctlRoundTrips(10) // warm
		b.ResetTimer()
		base = e.sousctlRoundTrips(b.N)
		reportPercentiles(b, append([]time.Duration(nil), base...))
	})
	b.Run("design=gateway", func(b *testing.B) {
		e := setup(b, "tiny", workload{})
		stop := e.startSous(instant{}, 1, nil)
		defer stop()
		url := e.startGateway(time.Minute)
		e.gatewayRoundTrips(url, 10) // warm: the HTTP connection and the lanes
		b.ResetTimer()
		lat := e.gatewayRoundTrips(url, b.N)
		reportPercentiles(b, append([]time.Duration(nil), lat...))
		if len(base) > 0 {
			b.ReportMetric(percentile(lat, 0.5)-percentile(base, 0.5), "added-p50-ms")
			b.ReportMetric(percentile(lat, 0.99)-percentile(base, 0.99), "added-p99-ms")
		}
	})
	// The two designs above run one after the other, so a burst of load
	// on a shared machine lands on one and not the other. Here one worker
	// serves both, and each sousctl round trip is followed by a gateway
	// round trip: both designs see the same machine, op by op. added-* is
	// the gateway's percentile minus sousctl's.
	b.Run("design=interleaved", func(b *testing.B) {
		e := setup(b, "tiny", workload{})
		stop := e.startSous(instant{}, 1, nil)
		defer stop()
		url := e.startGateway(time.Minute)
		sc := e.sousctl()
		for range 10 { // warm
			sc.roundTrip()
			e.gatewayRoundTrip(url)
		}
		b.ResetTimer()
		var s, g []time.Duration
		for range b.N {
			s = append(s, sc.roundTrip())
			g = append(g, e.gatewayRoundTrip(url))
		}
		b.ReportMetric(percentile(s, 0.5), "sousctl-p50-ms")
		b.ReportMetric(percentile(s, 0.99), "sousctl-p99-ms")
		b.ReportMetric(percentile(g, 0.5), "gateway-p50-ms")
		b.ReportMetric(percentile(g, 0.99), "gateway-p99-ms")
		b.ReportMetric(percentile(g, 0.5)-percentile(s, 0.5), "added-p50-ms")
		b.ReportMetric(percentile(g, 0.99)-percentile(s, 0.99), "added-p99-ms")
	})
}

// gated holds every call until release is closed.
type gated struct{ release chan struct{} }

func (g gated) Infer(ctx context.Context, reqs []inference.Request) ([]inference.Result, error) {
	select {
	case <-g.release:
	case <-ctx.Done():
	}
	return instant{}.Infer(ctx, reqs)
}

// BenchmarkGatewayOpenStreams: 200 streams held open at once (published,
// confirmed, waiting with keep-alive comments while the engine holds every
// call), then answered. One op is one round of 200 streams; the metrics
// are the process's heap and goroutines per open stream (the benchmark's
// HTTP clients, gateway and worker share the process, so these are upper
// bounds for the gateway), the heap growth per round after the first
// (flat memory: near zero), and the time from release to the last [DONE].
func BenchmarkGatewayOpenStreams(b *testing.B) {
	const streams = 200
	e := setup(b, "tiny", workload{})
	g := gated{release: make(chan struct{})}
	stop := e.startSous(&g, 32, nil)
	defer stop()
	url := e.startGateway(5 * time.Minute)
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: streams, MaxConnsPerHost: streams}}
	heap := func() (uint64, int) {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapInuse, runtime.NumGoroutine()
	}
	var warmHeap uint64 // after the first round: pools and idle connections exist
	var perStream, goroutinesPer, drain float64
	b.ResetTimer()
	for round := range b.N {
		g.release = make(chan struct{})
		h0, g0 := heap()
		if round == 1 {
			warmHeap = h0
		}
		var opened, done sync.WaitGroup
		opened.Add(streams)
		done.Add(streams)
		for range streams {
			go func() {
				defer done.Done()
				resp, err := client.Post(url+"/v1/chat/completions", "application/json",
					strings.NewReader(`{"messages":[{"role":"user","content":"hi"}],"stream":true}`))
				if err != nil {
					opened.Done()
					b.Error(err)
					return
				}
				defer resp.Body.Close()
				br := bufio.NewReader(resp.Body)
				_, _ = br.ReadString('\n') // ": queued": published and confirmed
				opened.Done()
				rest, _ := io.ReadAll(br)
				if !strings.HasSuffix(string(rest), "data: [DONE]\n\n") {
					b.Errorf("stream ended without [DONE]: %q", rest)
				}
			}()
		}
		opened.Wait()
		h1, g1 := heap()
		perStream = float64(int64(h1)-int64(h0)) / streams / 1024
		goroutinesPer = float64(g1-g0) / streams
		t0 := time.Now()
		close(g.release)
		done.Wait()
		drain = float64(time.Since(t0).Milliseconds())
	}
	b.StopTimer()
	hEnd, _ := heap()
	b.ReportMetric(perStream, "heap-KiB/open-stream")
	b.ReportMetric(goroutinesPer, "goroutines/open-stream")
	b.ReportMetric(drain, "ms-release-to-all-done")
	if b.N > 1 {
		b.ReportMetric(float64(int64(hEnd)-int64(warmHeap))/1024/float64(b.N-1), "heap-KiB-growth/round")
	}
}

// firstToken posts a streamed chat request and returns the time to the
// first SSE event with content, reading the stream to its end.
func firstToken(b *testing.B, url, body string) time.Duration {
	b.Helper()
	t0 := time.Now()
	resp, err := http.Post(url, "application/json", strings.NewReader(body))
	if err != nil {
		b.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(resp.Body)
		b.Fatalf("%s: %d %s", url, resp.StatusCode, msg)
	}
	sc := bufio.NewScanner(resp.Body)
	var ttft time.Duration
	for sc.Scan() {
		data, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok || ttft > 0 || data == "[DONE]" {
			continue
		}
		var c struct {
			Choices []struct {
				Delta struct {
					Content string `json:"content"`
				} `json:"delta"`
			} `json:"choices"`
		}
		if json.Unmarshal([]byte(data), &c) == nil && len(c.Choices) > 0 && c.Choices[0].Delta.Content != "" {
			ttft = time.Since(t0)
		}
	}
	if ttft == 0 {
		b.Fatal("no content in the stream")
	}
	return ttft
}

// BenchmarkGatewayTimeToFirstToken: the same streamed chat request (the
// endless tiny model, 16 tokens) to the real Ollama's own OpenAI endpoint
// and through the gateway → RabbitMQ → a worker → that Ollama; time to the
// first content chunk, one request at a time.
func BenchmarkGatewayTimeToFirstToken(b *testing.B) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	srv, err := ollamatest.Start(ctx, ollamatest.Options{NumParallel: 4})
	if err != nil {
		b.Fatal(err)
	}
	defer srv.Stop(context.Background())
	model := srv.EndlessModel()
	body := `{"model":"` + model + `","messages":[{"role":"user","content":"hello"}],"stream":true,"max_tokens":16,"temperature":0}`
	var direct []time.Duration
	b.Run("design=ollama-direct", func(b *testing.B) {
		firstToken(b, srv.URL()+"/v1/chat/completions", body) // load the model
		b.ResetTimer()
		direct = direct[:0]
		for range b.N {
			direct = append(direct, firstToken(b, srv.URL()+"/v1/chat/completions", body))
		}
		reportPercentiles(b, append([]time.Duration(nil), direct...))
	})
	// The worker sends a chunk when SOUS_STREAM_INTERVAL has passed since
	// the last one, counted for the first chunk from the engine call's
	// start: with the default 50ms the first token waits for it.
	for _, interval := range []time.Duration{0, time.Millisecond} {
		name := "design=gateway"
		if interval > 0 {
			name += "/stream-interval=" + interval.String()
		}
		b.Run(name, func(b *testing.B) {
			eng, err := ollama.New(ollama.Config{URL: srv.URL()})
			if err != nil {
				b.Fatal(err)
			}
			e := setup(b, "tiny", workload{})
			e.model = model
			e.streamInterval = interval
			stop := e.startSous(eng, 4, nil)
			defer stop()
			url := e.startGateway(time.Minute) + "/v1/chat/completions"
			firstToken(b, url, body)
			b.ResetTimer()
			lat := make([]time.Duration, 0, b.N)
			for range b.N {
				lat = append(lat, firstToken(b, url, body))
			}
			reportPercentiles(b, append([]time.Duration(nil), lat...))
			if len(direct) > 0 {
				b.ReportMetric(percentile(lat, 0.5)-percentile(direct, 0.5), "added-p50-ms")
			}
		})
	}
}

// instant answers every request at once, in process.
type instant struct{}

func (instant) Infer(_ context.Context, reqs []inference.Request) ([]inference.Result, error) {
	out := make([]inference.Result, len(reqs))
	for i := range out {
		out[i].Response = inference.Response{Text: "ok", DoneReason: "stop"}
	}
	return out, nil
}
