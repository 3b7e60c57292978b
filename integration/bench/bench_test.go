package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"os"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/sous-run/sous/integration/itest"
	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/queue"
	"github.com/sous-run/sous/internal/queue/rabbitmq"
	"github.com/sous-run/sous/internal/secret"
	"github.com/sous-run/sous/internal/sizing"
	"github.com/sous-run/sous/internal/wire"
	"github.com/sous-run/sous/internal/worker"
)

var (
	brokerURL = "amqp://guest:guest@127.0.0.1:5672/"
	seq       atomic.Int64
	declared  itest.Queues // deleted after the run
	tempDirs  []string     // removed after the run
)

func TestMain(m *testing.M) {
	if u := os.Getenv("RABBITMQ_URL"); u != "" {
		brokerURL = u
	}
	code := m.Run()
	declared.Delete(brokerURL)
	for _, d := range tempDirs {
		_ = os.RemoveAll(d)
	}
	os.Exit(code)
}

// maxAttempts is SOUS_MAX_ATTEMPTS's default, which cmd/worker also gives
// the driver as the queue's x-delivery-limit.
const maxAttempts = 5

// defaultSizer is the worker's sizer as cmd/worker builds it with only
// SOUS_ENGINE_PARALLEL set and no GPU: sizing's defaults, and Size() the
// decision's size (cmd/worker/sizer.go's batchSizer).
type defaultSizer struct{ *sizing.Sizer }

func (s defaultSizer) Size() int { return s.Sizer.Size().Size }

func newDefaultSizer(b *testing.B, slots int) defaultSizer {
	b.Helper()
	s, err := sizing.New(nil, sizing.Config{EngineParallel: slots}.WithDefaults())
	if err != nil {
		b.Fatal(err)
	}
	return defaultSizer{s}
}

// workload is the requests of one comparison: request i asks for
// tokens(i) tokens. Every design gets the same requests.
type workload struct {
	tokens func(i int) int
	// temperature 0 is added for a real model, so its answers are
	// deterministic.
	temperature bool
}

// mixed asks short tokens for 9 requests in 10 and long for the tenth
// (index 9, 19, ...): a deterministic pattern, so every design gets the
// same requests in the same order.
func mixed(short, long int) workload {
	return workload{tokens: func(i int) int {
		if i%10 == 9 {
			return long
		}
		return short
	}}
}

func uniform(tokens int) workload { return workload{tokens: func(int) int { return tokens }} }

func (w workload) body(i int) []byte {
	t := ""
	if w.temperature {
		t = `,"temperature":0`
	}
	return fmt.Appendf(nil, `{"prompt":"hello","options":{"num_predict":%d%s}}`, w.tokens(i), t)
}

// request is request i as the engine gets it from sous, for designs that
// call the engine directly.
func (w workload) request(model string, i int) inference.Request {
	opts := map[string]any{"num_predict": int64(w.tokens(i))}
	if w.temperature {
		opts["temperature"] = 0.0
	}
	return inference.Request{Kind: inference.Generate, Model: model, Prompt: "hello", Options: opts}
}

func requestID(i int) string { return "r" + strconv.Itoa(i) }

type env struct {
	b       *testing.B
	conn    *amqp.Connection
	ch      *amqp.Channel
	queue   string
	dlq     string
	results string
	model   string // the workers' default (and only allowed) model
	work    workload
	// streamInterval is the worker's StreamInterval (0: its default, 50ms).
	streamInterval time.Duration
	// cpu, when set, is stopped the moment the timer stops: checking the
	// results is not the design's work.
	cpu *cpuMeter
}

// limits are cmd/worker's defaults (SOUS_MAX_BODY_BYTES and so on) with
// the env's model as SOUS_MODEL.
func (e *env) limits() wire.Limits {
	return wire.Limits{MaxBodyBytes: 1 << 20, MaxPromptBytes: 256 << 10, MaxNumPredict: 4096, DefaultModel: e.model}
}

// setup declares a fresh input queue, dead-letter queue and results queue
// with the arguments sous's driver declares them with.
func setup(b *testing.B, model string, work workload) *env {
	b.Helper()
	conn, ch := publisher(b)
	q := fmt.Sprintf("sous-bench-%d-%d", os.Getpid(), seq.Add(1))
	e := &env{b: b, conn: conn, ch: ch, queue: q, dlq: q + ".dlq", results: q + ".results", model: model, work: work}
	quorum := amqp.Table{"x-queue-type": "quorum"}
	for name, args := range map[string]amqp.Table{
		e.queue:   {"x-queue-type": "quorum", "x-dead-letter-exchange": "", "x-dead-letter-routing-key": e.dlq, "x-delivery-limit": int64(maxAttempts)},
		e.dlq:     quorum,
		e.results: quorum,
	} {
		declared.Add(name)
		if _, err := ch.QueueDeclare(name, true, false, false, false, args); err != nil {
			b.Fatal(err)
		}
	}
	return e
}

// publisher connects to the broker, closed when b ends, with a channel in
// confirm mode.
func publisher(b *testing.B) (*amqp.Connection, *amqp.Channel) {
	b.Helper()
	conn, err := amqp.Dial(brokerURL)
	if err != nil {
		b.Fatalf("RabbitMQ at %s (`rabbitmq-server -detached`): %v", brokerURL, err)
	}
	b.Cleanup(func() { conn.Close() })
	ch, err := conn.Channel()
	if err != nil {
		b.Fatal(err)
	}
	if err := ch.Confirm(false); err != nil {
		b.Fatal(err)
	}
	return conn, ch
}

// fill publishes requests 0 to n-1 of the env's workload, confirmed.
func (e *env) fill(n int) {
	e.b.Helper()
	confs := make([]*amqp.DeferredConfirmation, 0, n)
	for i := range n {
		c, err := e.ch.PublishWithDeferredConfirmWithContext(context.Background(), "", e.queue, false, false, amqp.Publishing{
			MessageId: requestID(i), ContentType: "application/json", DeliveryMode: amqp.Persistent, Body: e.work.body(i)})
		if err != nil {
			e.b.Fatal(err)
		}
		confs = append(confs, c)
	}
	for _, c := range confs {
		if !c.Wait() {
			e.b.Fatal("request not confirmed")
		}
	}
}

// checkResults fails unless the results queue holds exactly one good
// answer for each of requests 0 to n-1, with the tokens asked for, and
// nothing is left in the input or dead-letter queue. Call it after the
// design has stopped (its connections closed), with the timer stopped:
// consuming results is the producers' work, which no design does while
// it is timed.
func (e *env) checkResults(n int) {
	e.b.Helper()
	var in, dead, out int
	settled := itest.Eventually(30*time.Second, func() bool {
		in = itest.QueueDepth(e.b, e.conn, e.queue)
		dead = itest.QueueDepth(e.b, e.conn, e.dlq)
		out = itest.QueueDepth(e.b, e.conn, e.results)
		return in == 0 && out >= n
	})
	if !settled || dead != 0 || out != n {
		e.b.Fatalf("after the run: %d requests left in the input queue, %d dead-lettered, %d results for %d requests", in, dead, out, n)
	}
	ch, err := e.conn.Channel()
	if err != nil {
		e.b.Fatal(err)
	}
	defer ch.Close()
	ds, err := ch.Consume(e.results, "", true, false, false, false, nil)
	if err != nil {
		e.b.Fatal(err)
	}
	seen := make([]int, n)
	timeout := time.After(time.Minute)
	for got := 0; got < n; got++ {
		select {
		case d := <-ds:
			var r wire.Result
			if err := json.Unmarshal(d.Body, &r); err != nil || r.Status != wire.StatusOK {
				e.b.Fatalf("bad result: %s", d.Body)
			}
			i, err := strconv.Atoi(strings.TrimPrefix(r.ID, "r"))
			if err != nil || !strings.HasPrefix(r.ID, "r") || i < 0 || i >= n {
				e.b.Fatalf("result for an unknown request id %q", r.ID)
			}
			seen[i]++
			if seen[i] > 1 {
				e.b.Fatalf("request %s answered twice", r.ID)
			}
			if r.Usage == nil || r.Usage.OutputTokens != e.work.tokens(i) {
				e.b.Fatalf("request %s asked for %d tokens, its result says %+v", r.ID, e.work.tokens(i), r.Usage)
			}
		case <-timeout:
			e.b.Fatalf("%d of %d results read back", got, n)
		}
	}
}

// runObserver is an Observer that closes done when n deliveries have been
// acked (the in-process worker's own count, which costs the broker
// nothing, as the hand-written worker's count of its own acks does), and
// measures where a request's time goes in sous: waiting in the worker for
// a slot (receipt to dispatch), on the engine, and waiting for the
// result's publisher confirm. A sampler notes how often the engine had a
// free slot while nothing waited in the worker and the queue still held
// requests: the worker starved for deliveries, so the broker, not the
// engine, set the pace.
type runObserver struct {
	worker.NopObserver
	n     int64
	limit int64
	acks  atomic.Int64
	done  chan struct{}

	received atomic.Int64
	waiting  atomic.Int64 // received, decoded and not yet dispatched
	onEngine atomic.Int64 // dispatched and not yet answered
	waitNS   atomic.Int64 // sums, over requests
	engineNS atomic.Int64
	pubNS    atomic.Int64
	pubs     atomic.Int64
	samples  atomic.Int64
	starved  atomic.Int64 // samples with a free slot, nothing waiting, more in the queue
}

func newRunObserver(n, limit int) *runObserver {
	return &runObserver{n: int64(n), limit: int64(limit), done: make(chan struct{})}
}

func (o *runObserver) Received(ctx context.Context, _ *queue.Delivery) context.Context {
	o.received.Add(1)
	o.waiting.Add(1)
	return ctx
}

func (o *runObserver) BatchStarted(ctx context.Context, b *worker.BatchEvent) context.Context {
	n := int64(len(b.Items))
	o.waiting.Add(-n)
	o.onEngine.Add(n)
	for _, it := range b.Items {
		o.waitNS.Add(int64(b.Start.Sub(it.Delivery.ReceivedAt)))
	}
	return ctx
}

func (o *runObserver) BatchFinished(_ context.Context, b *worker.BatchEvent, elapsed time.Duration) {
	n := int64(len(b.Items))
	o.onEngine.Add(-n)
	o.engineNS.Add(n * int64(elapsed))
}

func (o *runObserver) Publishing(context.Context, *queue.Message, string) func(error) {
	t0 := time.Now()
	return func(error) {
		o.pubNS.Add(int64(time.Since(t0)))
		o.pubs.Add(1)
	}
}

func (o *runObserver) Done(_ context.Context, _ *queue.Delivery, out worker.Outcome) {
	if out.Settlement.Action == queue.Ack && o.acks.Add(1) == o.n {
		close(o.done)
	}
}

// sample runs until done, every 5 ms.
func (o *runObserver) sample() {
	t := time.NewTicker(5 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-o.done:
			return
		case <-t.C:
		}
		if o.received.Load() >= o.n {
			continue // the queue is empty: the run's tail, as for every design
		}
		o.samples.Add(1)
		if o.waiting.Load() <= 0 && o.onEngine.Load() < o.limit {
			o.starved.Add(1)
		}
	}
}

// report adds wait-ms, engine-ms and confirm-ms (means per request) and
// starved (the share of samples, before the queue ran empty, with a free
// slot and nothing waiting in the worker).
func (o *runObserver) report(b *testing.B) {
	if o.n == 0 {
		return
	}
	ms := func(ns int64, n int64) float64 { return float64(ns) / float64(max(1, n)) / 1e6 }
	b.ReportMetric(ms(o.waitNS.Load(), o.n), "wait-ms")
	b.ReportMetric(ms(o.engineNS.Load(), o.n), "engine-ms")
	b.ReportMetric(ms(o.pubNS.Load(), o.pubs.Load()), "confirm-ms")
	if s := o.samples.Load(); s > 0 {
		b.ReportMetric(float64(o.starved.Load())/float64(s), "starved")
	}
}

// runSous runs the sous worker in-process on the env's queue until it has
// acked n requests, then checks every result with the timer stopped, and
// reports where the requests' time went (runObserver).
// Opening the driver is timed: it starts consuming as it connects, as the
// hand-written worker does when it consumes.
func (e *env) runSous(engine worker.Engine, slots, n int) {
	e.b.Helper()
	o := newRunObserver(n, newDefaultSizer(e.b, slots).Size())
	stop := e.startSous(engine, slots, o)
	go o.sample()
	select {
	case <-o.done:
	case <-time.After(10 * time.Minute):
		e.b.Fatalf("%d of %d requests acked", o.acks.Load(), n)
	}
	e.b.StopTimer()
	e.cpu.stop()
	stop()
	e.checkResults(n)
	o.report(e.b)
	e.b.StartTimer()
}

// startSous starts sous as cmd/worker does with only SOUS_ENGINE_PARALLEL
// (slots), SOUS_MODEL and the queues set: the default sizer, the driver
// opened with the prefetch worker.Capacity(limit), and every worker
// setting at its default. obs (nil: none) is the one addition, to count
// acks and time the stages. stop drains the worker and closes the driver. The worker's
// goroutines, the driver's and its HTTP client's carry the pprof label
// design=sous, so `go tool pprof -tagfocus=design=sous` shows sous's side
// of a CPU profile.
func (e *env) startSous(engine worker.Engine, slots int, obs worker.Observer) (stop func()) {
	e.b.Helper()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	ctx, cancel := context.WithCancel(context.Background())
	e.b.Cleanup(cancel) // a failed benchmark does not leave the worker running
	sizer := newDefaultSizer(e.b, slots)
	var d *rabbitmq.Driver
	done := make(chan error, 1)
	pprof.Do(ctx, pprof.Labels("design", "sous"), func(ctx context.Context) {
		var err error
		d, err = rabbitmq.Open(ctx, rabbitmq.Config{
			URL: secret.Value(brokerURL), Queue: e.queue, DeadLetterQueue: e.dlq,
			Declare: true, ExtraQueues: []string{e.results}, DeliveryLimit: maxAttempts,
			Prefetch: worker.Capacity(sizer.Size()), ConnectionName: "sous-bench", Consume: true,
		}, log)
		if err != nil {
			e.b.Fatal(err)
		}
		w := worker.New(worker.Config{WorkerID: "bench", ResultsQueue: e.results, Limits: e.limits(), Observer: obs, StreamInterval: e.streamInterval}, d, engine, sizer, log)
		go func() { done <- w.Run(ctx) }()
	})
	return func() {
		cancel()
		if err := <-done; err != nil {
			e.b.Fatal(err)
		}
		_ = d.Close()
	}
}

// runDirect is the plain client: conc goroutines that call the engine
// directly, no broker, keeping conc requests in flight until requests 0
// to n-1 have answered; each is answered exactly once with the tokens it
// asked for, or the benchmark fails.
func runDirect(b *testing.B, eng worker.Engine, model string, work workload, conc, n int) {
	b.Helper()
	next := make(chan int, n)
	for i := range n {
		next <- i
	}
	close(next)
	answered := make([]atomic.Int32, n)
	var wg sync.WaitGroup
	for range conc {
		wg.Go(func() {
			for i := range next {
				res, err := eng.Infer(context.Background(), []inference.Request{work.request(model, i)})
				if err == nil && len(res) == 1 {
					err = res[0].Err
				}
				if err != nil {
					b.Error(err)
					return
				}
				if got := res[0].Response.Usage.OutputTokens; got != work.tokens(i) {
					b.Errorf("request %d asked for %d tokens and got %d", i, work.tokens(i), got)
				}
				answered[i].Add(1)
			}
		})
	}
	wg.Wait()
	for i := range answered {
		if c := answered[i].Load(); c != 1 {
			b.Fatalf("request %d answered %d times", i, c)
		}
	}
}

// perSecond reports requests per second of timed work, and returns it.
func perSecond(b *testing.B) float64 {
	rate := float64(b.N) / b.Elapsed().Seconds()
	b.ReportMetric(rate, "msgs/s")
	return rate
}

// baseline remembers a design's rate in one run of a benchmark, so that the
// designs after it report their ratio to it ("x<unit>"): ratios measured
// side by side, on the same broker, minutes apart at most.
type baseline struct {
	n    int
	rate float64
}

func (bl *baseline) set(b *testing.B, rate float64) { bl.n, bl.rate = b.N, rate }

// ratio reports rate / the baseline's, when the baseline ran with the same
// b.N (it did not run when a -bench pattern left it out).
func (bl *baseline) ratio(b *testing.B, rate float64, unit string) {
	if bl.n == b.N && bl.rate > 0 {
		b.ReportMetric(rate/bl.rate, unit)
	}
}

// cpuMeter measures CPU time per request over the timed part of a design:
// this process's (the design, and the engine's HTTP server where there is
// one, which is the same work for every design), and the broker's where
// its process can be found on this machine (RabbitMQ's beam.smp).
type cpuMeter struct {
	self, broker time.Duration
	brokerPID    int
	stopped      bool
	selfEnd      time.Duration // at stop
	brokerEnd    time.Duration
}

func startCPU() *cpuMeter {
	m := &cpuMeter{brokerPID: findBroker()}
	m.self, m.broker = selfCPU(), procCPU(m.brokerPID)
	return m
}

// stop ends the measurement (nil: nothing is measured).
func (m *cpuMeter) stop() {
	if m != nil && !m.stopped {
		m.stopped, m.selfEnd, m.brokerEnd = true, selfCPU(), procCPU(m.brokerPID)
	}
}

// report adds cpu-us/msg (this process) and broker-cpu-us/msg metrics,
// up to stop.
func (m *cpuMeter) report(b *testing.B) {
	m.stop()
	self, broker := m.selfEnd-m.self, m.brokerEnd-m.broker
	b.ReportMetric(float64(self.Microseconds())/float64(b.N), "cpu-us/msg")
	if m.brokerPID > 0 {
		b.ReportMetric(float64(broker.Microseconds())/float64(b.N), "broker-cpu-us/msg")
	}
}

func selfCPU() time.Duration {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// findBroker returns the pid of the process that listens on the broker
// URL's port on this machine (RabbitMQ's beam.smp), or 0: the listening
// socket's inode from /proc/net/tcp*, then the process holding it.
func findBroker() int {
	u, err := url.Parse(brokerURL)
	if err != nil {
		return 0
	}
	port, err := strconv.Atoi(u.Port())
	if err != nil {
		port = 5672
	}
	want := fmt.Sprintf(":%04X", port)
	inodes := map[string]bool{}
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		raw, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(raw), "\n")[1:] {
			// sl local_address rem_address st ... inode (field 9)
			fs := strings.Fields(line)
			if len(fs) > 9 && strings.HasSuffix(fs[1], want) && fs[3] == "0A" {
				inodes["socket:["+fs[9]+"]"] = true
			}
		}
	}
	if len(inodes) == 0 {
		return 0
	}
	ents, _ := os.ReadDir("/proc")
	for _, ent := range ents {
		pid, err := strconv.Atoi(ent.Name())
		if err != nil {
			continue
		}
		if comm, err := os.ReadFile("/proc/" + ent.Name() + "/comm"); err != nil || strings.TrimSpace(string(comm)) != "beam.smp" {
			continue
		}
		fds, _ := os.ReadDir("/proc/" + ent.Name() + "/fd")
		for _, fd := range fds {
			if l, err := os.Readlink("/proc/" + ent.Name() + "/fd/" + fd.Name()); err == nil && inodes[l] {
				return pid
			}
		}
	}
	return 0
}

// procCPU is a process's user + system CPU time from /proc/pid/stat.
func procCPU(pid int) time.Duration {
	if pid <= 0 {
		return 0
	}
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// Fields after the command name, which is in parentheses: utime and
	// stime are fields 14 and 15 of the line, 12 and 13 after ")".
	s := string(raw)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(f) < 13 {
		return 0
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	const hz = 100 // USER_HZ on Linux
	return time.Duration(ut+st) * time.Second / hz
}
