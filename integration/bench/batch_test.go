package bench

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sous-run/sous/integration/itest"
)

var (
	gatewayOnce sync.Once
	gatewayBin  string
	gatewayErr  error
)

// buildGateway builds cmd/gateway once per run (a process of its own, so
// that its memory is its own).
func buildGateway(b *testing.B) string {
	b.Helper()
	gatewayOnce.Do(func() {
		dir, err := os.MkdirTemp("", "sous-bench-gateway-")
		if err != nil {
			gatewayErr = err
			return
		}
		tempDirs = append(tempDirs, dir)
		gatewayBin = filepath.Join(dir, "gateway")
		out, err := exec.Command("go", "build", "-o", gatewayBin, "../../cmd/gateway").CombinedOutput()
		if err != nil {
			gatewayErr = fmt.Errorf("build the gateway: %v\n%s", err, out)
		}
	})
	if gatewayErr != nil {
		b.Fatal(gatewayErr)
	}
	return gatewayBin
}

// BenchmarkBatchAPI: b.N requests (make bench: 50,000, OpenAI's largest
// batch) run as one batch through the gateway's Batch API, against the
// same requests published straight to the queue; the same sous worker
// drains both, on the stand-in engine of BenchmarkUniform (32 slots,
// 50 ms + 2 ms per running request). The direct design's queue is filled
// before its clock starts, the strongest baseline: the batch's clock runs
// from in_progress (validated) to completed, so its pacing, publishing and
// recording are all in it. Reported: the ratio (xdirect, goal ≥ 0.95),
// the validation time, and the gateway's peak resident memory (a process
// of its own, the embedded SQLite store, every setting at its default).
func BenchmarkBatchAPI(b *testing.B) {
	const slots = 32
	engine := func() *slotEngine { return newSlotEngine(slots, 50*time.Millisecond, 2*time.Millisecond, 0) }
	work := uniform(4)
	var base baseline
	b.Run("design=direct", func(b *testing.B) {
		e := setup(b, "tiny", work)
		e.fill(b.N)
		b.ResetTimer()
		e.runSous(engine(), slots, b.N)
		base.set(b, perSecond(b))
	})
	b.Run("design=batch", func(b *testing.B) {
		e := setup(b, "tiny", work)
		bin := buildGateway(b)
		results := e.queue + ".batch"
		declared.Add(results)
		addr := itest.FreeAddr(b)
		gw := itest.StartWorker(b, itest.WorkerOptions{Bin: bin, Env: []string{
			"SOUS_AMQP_URL=" + brokerURL, "SOUS_QUEUE=" + e.queue, "SOUS_DEAD_LETTER_QUEUE=" + e.dlq, "SOUS_GATEWAY_ADDR=" + addr,
			"SOUS_MODEL=" + e.model, "SOUS_GATEWAY_DATABASE_URL=sqlite:" + filepath.Join(b.TempDir(), "gw.db"),
			"SOUS_GATEWAY_BATCH_RESULTS_QUEUE=" + results, "SOUS_LOG_LEVEL=warn",
		}})
		api := "http://" + addr
		stop := e.startSous(engine(), slots, nil)
		defer stop()

		b.StopTimer()
		var in bytes.Buffer
		for i := range b.N {
			fmt.Fprintf(&in, `{"custom_id":"r%d","method":"POST","url":"/v1/completions","body":{"model":%q,"prompt":"hello","max_tokens":%d}}`+"\n", i, e.model, work.tokens(i))
		}
		fileID := uploadBatchFile(b, api, in.Bytes())
		created := time.Now()
		batchID := createBatch(b, api, fileID)
		st := waitBatch(b, api, batchID, func(s batchStatus) bool { return s.Status != "validating" })
		if st.Status != "in_progress" {
			b.Fatalf("validation ended %+v", st)
		}
		b.ReportMetric(time.Since(created).Seconds(), "validate-s")
		b.StartTimer()
		st = waitBatch(b, api, batchID, func(s batchStatus) bool {
			return s.Status == "completed" || s.Status == "failed" || s.Status == "expired"
		})
		b.StopTimer()
		if st.Status != "completed" || st.RequestCounts.Completed != b.N || st.RequestCounts.Failed != 0 {
			b.Fatalf("batch ended %+v", st)
		}
		checkBatchOutput(b, api, st.OutputFileID, work.tokens, b.N)
		base.ratio(b, perSecond(b), "xdirect")
		b.ReportMetric(float64(peakRSS(b, gw.Pid()))/(1<<20), "gateway-peak-MiB")
		b.StartTimer()
	})
}

type batchStatus struct {
	Status        string `json:"status"`
	OutputFileID  string `json:"output_file_id"`
	RequestCounts struct {
		Total, Completed, Failed int
	} `json:"request_counts"`
}

func uploadBatchFile(b *testing.B, api string, content []byte) string {
	b.Helper()
	var body bytes.Buffer
	mw := multipart.NewWriter(&body)
	_ = mw.WriteField("purpose", "batch")
	fw, _ := mw.CreateFormFile("file", "bench.jsonl")
	_, _ = fw.Write(content)
	_ = mw.Close()
	resp, err := http.Post(api+"/v1/files", mw.FormDataContentType(), &body)
	if err != nil {
		b.Fatal(err)
	}
	defer resp.Body.Close()
	var f struct{ ID string }
	if err := json.NewDecoder(resp.Body).Decode(&f); err != nil || resp.StatusCode != 200 {
		b.Fatalf("upload: %d %v", resp.StatusCode, err)
	}
	return f.ID
}

func createBatch(b *testing.B, api, fileID string) string {
	b.Helper()
	resp, err := http.Post(api+"/v1/batches", "application/json",
		strings.NewReader(fmt.Sprintf(`{"input_file_id":%q,"endpoint":"/v1/completions","completion_window":"24h"}`, fileID)))
	if err != nil {
		b.Fatal(err)
	}
	defer resp.Body.Close()
	var s struct{ ID string }
	if err := json.NewDecoder(resp.Body).Decode(&s); err != nil || resp.StatusCode != 200 {
		b.Fatalf("create: %d %v", resp.StatusCode, err)
	}
	return s.ID
}

func waitBatch(b *testing.B, api, id string, done func(batchStatus) bool) batchStatus {
	b.Helper()
	deadline := time.Now().Add(30 * time.Minute)
	for {
		var s batchStatus
		resp, err := http.Get(api + "/v1/batches/" + id)
		if err == nil {
			_ = json.NewDecoder(resp.Body).Decode(&s)
			resp.Body.Close()
		}
		if done(s) {
			return s
		}
		if time.Now().After(deadline) {
			b.Fatalf("batch %s: %+v after 30 minutes", id, s)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// checkBatchOutput fails unless the output file answers every custom_id
// r0…r(n-1) exactly once, with the tokens it asked for.
func checkBatchOutput(b *testing.B, api, fileID string, tokens func(int) int, n int) {
	b.Helper()
	resp, err := http.Get(api + "/v1/files/" + fileID + "/content")
	if err != nil {
		b.Fatal(err)
	}
	defer resp.Body.Close()
	seen := make([]bool, n)
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	lines := 0
	for sc.Scan() {
		var l struct {
			CustomID string `json:"custom_id"`
			Response struct {
				StatusCode int `json:"status_code"`
				Body       struct {
					Usage struct {
						CompletionTokens int `json:"completion_tokens"`
					} `json:"usage"`
				} `json:"body"`
			} `json:"response"`
		}
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			b.Fatalf("output line: %v", err)
		}
		i, err := strconv.Atoi(strings.TrimPrefix(l.CustomID, "r"))
		if err != nil || i < 0 || i >= n || seen[i] {
			b.Fatalf("custom_id %q unknown or answered twice", l.CustomID)
		}
		seen[i] = true
		if l.Response.StatusCode != 200 || l.Response.Body.Usage.CompletionTokens != tokens(i) {
			b.Fatalf("%s: status %d, %d tokens, want %d", l.CustomID, l.Response.StatusCode, l.Response.Body.Usage.CompletionTokens, tokens(i))
		}
		lines++
	}
	if err := sc.Err(); err != nil {
		b.Fatal(err)
	}
	if lines != n {
		b.Fatalf("%d output lines, want %d", lines, n)
	}
}

// peakRSS is a process's peak resident memory (Linux's VmHWM), in bytes.
func peakRSS(b *testing.B, pid int) int64 {
	b.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(io.LimitReader(f, 1<<16))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmHWM:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb << 10
		}
	}
	b.Fatal("no VmHWM in /proc/PID/status")
	return 0
}
