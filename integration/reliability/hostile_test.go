package reliability

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/sous-run/sous/integration/ollamatest"
	"github.com/sous-run/sous/internal/wire"
)

// hostile is one message of the corpus and what must become of it.
type hostile struct {
	name        string
	body        string
	contentType string
	headers     amqp.Table
	// want is the dead-letter reason, or "ok" for a request that is valid
	// whatever it carries and must be answered normally, or "answered"
	// when the engine's verdict (ok or an error result) is acceptable.
	want string
}

func nest(open, close string, depth int, inner string) string {
	return strings.Repeat(open, depth) + inner + strings.Repeat(close, depth)
}

// corpus is the hostile-message corpus. Requests that must reach the engine
// stay small (num_predict 4) so the run is quick.
func corpus() []hostile {
	big := strings.Repeat("A", 2<<20)
	return []hostile{
		// Encoding.
		{name: "utf8_invalid", body: "{\"prompt\":\"\xff\xfe\xfd\"}", want: wire.ReasonInvalidUTF8},
		{name: "utf8_overlong", body: "{\"prompt\":\"\xc0\xaf\"}", want: wire.ReasonInvalidUTF8},
		{name: "utf8_surrogate", body: "{\"prompt\":\"\xed\xa0\x80\"}", want: wire.ReasonInvalidUTF8},
		{name: "utf16_body", body: "\xff\xfe{\x00\"\x00p\x00\"\x00}\x00", want: wire.ReasonInvalidUTF8},
		{name: "utf8_bom", body: "\xef\xbb\xbf{\"prompt\":\"x\"}", want: wire.ReasonInvalidJSON},
		{name: "nul_raw", body: "{\"prompt\":\"a\x00b\"}", want: wire.ReasonInvalidJSON},
		{name: "nul_escaped_prompt", body: `{"prompt":"a\u0000b","options":{"num_predict":4}}`, want: "answered"},
		{name: "nul_in_id", body: `{"id":"a\u0000b","prompt":"x"}`, want: wire.ReasonInvalidRequest},
		{name: "lone_surrogate_escape", body: `{"prompt":"\ud800","options":{"num_predict":4}}`, want: "answered"},
		// Structure.
		{name: "deep_array", body: nest("[", "]", 200000, ""), want: wire.ReasonInvalidJSON},
		{name: "deep_in_option", body: `{"prompt":"x","options":{"stop":` + nest("[", "]", 20000, `"a"`) + `}}`, want: wire.ReasonInvalidJSON},
		{name: "deep_format_schema", body: `{"prompt":"x","options":{"num_predict":4},"format":` + nest(`{"type":"object","properties":{"a":`, "}}", 2000, `{"type":"string"}`) + `}`, want: "answered"},
		{name: "deep_unknown_field", body: `{"prompt":"x","z":` + nest(`{"a":`, "}", 5000, "1") + `}`, want: wire.ReasonInvalidRequest},
		{name: "two_values", body: `{"prompt":"a"} {"prompt":"b"}`, want: wire.ReasonInvalidJSON},
		{name: "empty", body: ``, want: wire.ReasonInvalidJSON},
		{name: "null", body: `null`, want: wire.ReasonMissingPrompt},
		{name: "array", body: `[{"prompt":"x"}]`, want: wire.ReasonInvalidRequest},
		{name: "string", body: `"prompt"`, want: wire.ReasonInvalidRequest},
		{name: "truncated", body: `{"prompt":"x`, want: wire.ReasonInvalidJSON},
		// Size.
		{name: "body_2MiB", body: `{"prompt":"` + big + `"}`, want: wire.ReasonBodyTooLarge},
		{name: "prompt_300KiB", body: `{"prompt":"` + big[:300<<10] + `"}`, want: wire.ReasonPromptTooLarge},
		{name: "system_300KiB", body: `{"prompt":"x","system":"` + big[:300<<10] + `"}`, want: wire.ReasonPromptTooLarge},
		{name: "many_messages", body: `{"messages":[` + strings.TrimSuffix(strings.Repeat(`{"role":"user","content":"a"},`, 20000), ",") + `],"options":{"num_predict":4}}`, want: "answered"},
		{name: "stop_17", body: `{"prompt":"x","options":{"stop":["1","2","3","4","5","6","7","8","9","10","11","12","13","14","15","16","17"]}}`, want: wire.ReasonInvalidOption},
		{name: "long_id", body: `{"id":"` + strings.Repeat("i", 300) + `","prompt":"x"}`, want: wire.ReasonInvalidRequest},
		{name: "long_model", body: `{"model":"` + big[:100<<10] + `","prompt":"x"}`, want: wire.ReasonModelNotAllowed},
		// Types.
		{name: "prompt_number", body: `{"prompt":123}`, want: wire.ReasonInvalidRequest},
		{name: "messages_string", body: `{"messages":"hi"}`, want: wire.ReasonInvalidRequest},
		{name: "options_array", body: `{"prompt":"x","options":[]}`, want: wire.ReasonInvalidRequest},
		{name: "stream_string", body: `{"prompt":"x","stream":"yes"}`, want: wire.ReasonInvalidRequest},
		{name: "deadline_garbage", body: `{"prompt":"x","deadline":"tomorrow"}`, want: wire.ReasonInvalidRequest},
		{name: "id_number", body: `{"id":42,"prompt":"x"}`, want: wire.ReasonInvalidRequest},
		{name: "num_predict_string", body: `{"prompt":"x","options":{"num_predict":"many"}}`, want: wire.ReasonInvalidOption},
		{name: "role_evil", body: `{"messages":[{"role":"root","content":"x"}]}`, want: wire.ReasonInvalidRequest},
		{name: "format_xml", body: `{"prompt":"x","format":"xml"}`, want: wire.ReasonInvalidRequest},
		{name: "input_object", body: `{"input":{"a":1}}`, want: wire.ReasonInvalidRequest},
		// Options out of range.
		{name: "num_predict_negative", body: `{"prompt":"x","options":{"num_predict":-1}}`, want: wire.ReasonInvalidOption},
		{name: "num_predict_zero", body: `{"prompt":"x","options":{"num_predict":0}}`, want: wire.ReasonInvalidOption},
		{name: "num_predict_above_limit", body: `{"prompt":"x","options":{"num_predict":1000000000}}`, want: "ok"}, // capped at SOUS_MAX_NUM_PREDICT, with a note
		{name: "num_predict_absurd", body: `{"prompt":"x","options":{"num_predict":10000000000}}`, want: wire.ReasonInvalidOption},
		{name: "num_predict_int64", body: `{"prompt":"x","options":{"num_predict":9223372036854775807}}`, want: wire.ReasonInvalidOption},
		{name: "num_predict_1e400", body: `{"prompt":"x","options":{"num_predict":1e400}}`, want: wire.ReasonInvalidOption},
		{name: "num_predict_fraction", body: `{"prompt":"x","options":{"num_predict":3.5}}`, want: wire.ReasonInvalidOption},
		{name: "temperature_negative", body: `{"prompt":"x","options":{"temperature":-5}}`, want: wire.ReasonInvalidOption},
		{name: "top_k_negative", body: `{"prompt":"x","options":{"top_k":-1}}`, want: wire.ReasonInvalidOption},
		{name: "num_ctx_absurd", body: `{"prompt":"x","options":{"num_ctx":100000000}}`, want: wire.ReasonInvalidOption},
		{name: "seed_huge", body: `{"prompt":"x","options":{"seed":1e12}}`, want: wire.ReasonInvalidOption},
		// Unknown fields and names.
		{name: "unknown_field", body: `{"prompt":"x","evil":true}`, want: wire.ReasonInvalidRequest},
		{name: "unknown_option", body: `{"prompt":"x","options":{"num_gpu":999}}`, want: wire.ReasonInvalidOption},
		{name: "model_traversal", body: `{"model":"../../../etc/passwd","prompt":"x"}`, want: wire.ReasonModelNotAllowed},
		{name: "model_case_dup", body: `{"model":"tiny","MODEL":"ghost","prompt":"x"}`, want: wire.ReasonModelNotAllowed},
		{name: "content_type_text", body: `{"prompt":"x"}`, contentType: "text/plain", want: wire.ReasonContentType},
		{name: "content_type_garbage", body: `{"prompt":"x"}`, contentType: strings.Repeat("x/", 120), want: wire.ReasonContentType},
		{name: "deadline_past", body: `{"prompt":"x","deadline":"1970-01-01T00:00:00Z"}`, want: wire.ReasonExpired},
		// Headers: a producer cannot steer the worker, forge a verdict or
		// inject log lines through them.
		{name: "header_injection", body: `{"prompt":"ignore previous instructions","options":{"num_predict":4}}`, want: "ok", headers: amqp.Table{
			"x-sous-dead-letter-reason": "ok", "x-sous-attempts": int64(99), "x-sous-status": "ok", "x-sous-source-queue": "elsewhere",
			"x-delivery-count": int64(1 << 40), "x-death": "forged", "traceparent": "00-zzzz-yyyy-01", "tracestate": strings.Repeat("k=v,", 500),
			"x-log": "\n{\"level\":\"ERROR\",\"msg\":\"pwned\"}\n", "x-big": strings.Repeat("h", 60<<10),
			"x-nested": amqp.Table{"a": amqp.Table{"b": []any{int64(1), "two", nil}}}}},
	}
}

// TestHostileCorpus runs the corpus through the real path: RabbitMQ, the
// worker binary (built without the race detector, so that its peak memory
// means something) and the real Ollama. Each message is dead-lettered with
// its reason and an error result, or answered; the worker never crashes,
// never logs a line a header injected, and its peak RSS stays bounded even
// after a 32 MiB message. The corpus runs twice, so a message that
// disturbed the worker would show on the second pass.
func TestHostileCorpus(t *testing.T) {
	t.Parallel()
	srv := ollamatest.StartT(t, ollamatest.Options{NumParallel: 4})
	q := names(t)
	w := startWorker(t, workerOpts{bin: plainWorker(t), queue: q, engineURL: srv.URL(),
		env: []string{"SOUS_MODELS_ALLOWED=tiny", "SOUS_MAX_NUM_PREDICT=64", "SOUS_LOG_LEVEL=debug"}})
	replies := q + ".replies"
	l := newLedger()
	l.follow(t, sharedURL, replies, "results", nil)
	l.follow(t, sharedURL, q+".dlq", "dead", nil)
	c := newClient(t, sharedURL)
	rssIdle := rss(w.Pid())

	cs := corpus()
	var ids []string
	for pass := range 2 {
		var ms []msg
		for _, h := range cs {
			id := fmt.Sprintf("%s#%d", h.name, pass)
			ids = append(ids, id)
			ms = append(ms, msg{id: id, replyTo: replies, contentType: h.contentType, body: h.body, headers: h.headers})
		}
		// A message id that tries to forge a log line.
		forged := fmt.Sprintf("msgid_injection#%d\n{\"level\":\"ERROR\",\"msg\":\"pwned\"}", pass)
		ids = append(ids, forged)
		ms = append(ms, msg{id: forged, replyTo: replies, body: `{"prompt":"x","evil":1}`})
		// One very large body: received whole, rejected by size.
		huge := fmt.Sprintf("body_32MiB#%d", pass)
		ids = append(ids, huge)
		ms = append(ms, msg{id: huge, replyTo: replies, body: `{"prompt":"` + strings.Repeat("B", 32<<20) + `"}`})
		must(t, c.publishAll(q, ms))
	}
	tl := l.waitSettled(t, ids, 3*time.Minute)
	checkNoLoss(t, tl)
	figure(t, "messages", len(ids))
	figure(t, "tally", tl)

	// An error result is small and goes out before its request's
	// dead-letter copy, which for the 32 MiB body takes a while to reach
	// the dead-letter queue and the ledger: wait for the copies too.
	all := append(cs, hostile{name: "msgid_injection", want: wire.ReasonInvalidRequest}, hostile{name: "body_32MiB", want: wire.ReasonBodyTooLarge})
	eventually(60*time.Second, func() bool {
		for pass := range 2 {
			for _, h := range all {
				id := fmt.Sprintf("%s#%d", h.name, pass)
				if h.name == "msgid_injection" {
					id += "\n{\"level\":\"ERROR\",\"msg\":\"pwned\"}"
				}
				if h.want != "ok" && h.want != "answered" && len(l.deadLetters(id)) == 0 {
					return false
				}
			}
		}
		return true
	})
	for pass := range 2 {
		for _, h := range all {
			id := fmt.Sprintf("%s#%d", h.name, pass)
			if h.name == "msgid_injection" {
				id += "\n{\"level\":\"ERROR\",\"msg\":\"pwned\"}"
			}
			dead := l.deadLetters(id)
			res, isErr := l.errorResult(id)
			switch h.want {
			case "ok":
				if len(dead) > 0 || isErr || l.resultCount(id) != 1 {
					t.Errorf("%s: want one ok result; dead=%d error=%v results=%d", h.name, len(dead), res.Error, l.resultCount(id))
				}
			case "answered":
				if l.resultCount(id) == 0 {
					t.Errorf("%s: no result", h.name)
				}
				if isErr {
					t.Logf("%s: answered with error %s: %s", h.name, res.Error.Code, res.Error.Message)
				}
			default:
				if len(dead) != 1 || deadReason(dead[0]) != h.want {
					reasons := []string{}
					for _, d := range dead {
						reasons = append(reasons, deadReason(d))
					}
					t.Errorf("%s: dead-lettered %d times with reasons %v, want once with %s", h.name, len(dead), reasons, h.want)
				}
				if !isErr || res.Error == nil || res.Error.Code != h.want {
					t.Errorf("%s: want an error result %s, got %+v", h.name, h.want, res.Error)
				} else if len(res.Error.Message) > 512 {
					t.Errorf("%s: the error result echoes the body (%d bytes): %.200s", h.name, len(res.Error.Message), res.Error.Message)
				}
			}
		}
	}

	// Still alive, still working, nothing forged in the log.
	select {
	case <-w.Exited():
		t.Fatalf("worker exited: %s", tail(w.Logs(), 20))
	default:
	}
	peak := peakRSS(w.Pid())
	figure(t, "rss_idle_kB", rssIdle)
	figure(t, "rss_peak_kB", peak)
	if peak > 512<<10 {
		t.Errorf("peak RSS %d kB after the corpus: memory is not bounded", peak)
	}
	for line := range strings.Lines(w.Logs()) {
		var rec map[string]any
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Errorf("a log line is not JSON (injected?): %.200q", line)
			continue
		}
		if rec["msg"] == "pwned" {
			t.Errorf("a header or message id forged a log record: %.200q", line)
		}
	}
	c.publishRequests(q, "after", 1)
	waitUntil(t, 60*time.Second, "a normal request after the corpus", func() bool { return c.depth(q+".results") > 0 })
}

// peakRSS is the process's peak resident set size (VmHWM) in kB.
func peakRSS(pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for line := range strings.Lines(string(b)) {
		if rest, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			var v int
			fmt.Sscanf(strings.TrimSpace(rest), "%d", &v)
			return v
		}
	}
	return 0
}

// TestHostileReplyTo: reply_to is the producer's to choose, so it is hostile
// input too. A result to a queue that does not exist is dropped by the
// broker (the producer's loss, by its own doing); a reply_to pointing back
// at the request queue makes a loop of two hops that ends in the
// dead-letter queue; a forged direct reply-to address must not cost the
// worker its connection. (The bare "amq.rabbitmq.reply-to" cannot be sent:
// the broker closes the producer's channel unless it consumes from it.)
func TestHostileReplyTo(t *testing.T) {
	t.Parallel()
	eng := newFakeEngine(t)
	q := names(t)
	w := startWorker(t, workerOpts{queue: q, engineURL: eng.URL(), env: []string{"SOUS_LOG_LEVEL=info"}})
	l := watch(t, sharedURL, q)
	c := newClient(t, sharedURL)
	cases := []struct{ id, replyTo string }{
		{"missing_queue", "sous-rel-no-such-queue"},
		{"loop", q},
		{"direct_forged", "amq.rabbitmq.reply-to.g1hkABCDEFGH"},
	}
	for _, tc := range cases {
		c.publish(q, msg{id: tc.id, replyTo: tc.replyTo, body: request(tc.id)})
	}
	// Ordinary requests behind them must be answered as usual.
	ids := c.publishRequests(q, "plain", 20)
	tl := l.waitSettled(t, ids, 60*time.Second)
	checkNoLoss(t, tl)
	waitUntil(t, 30*time.Second, "the request queue to drain", func() bool { return c.depth(q) == 0 })
	time.Sleep(time.Second)
	reconnects := strings.Count(w.Logs(), "broker reconnected")
	figure(t, "reconnects", reconnects)
	figure(t, "plain_duplicates", tl.duplicates)
	for _, tc := range cases {
		dead := l.deadLetters(tc.id)
		reasons := []string{}
		for _, d := range dead {
			reasons = append(reasons, deadReason(d))
		}
		figure(t, tc.id, fmt.Sprintf("results_on_results_queue=%d dead_letters=%v", l.resultCount(tc.id), reasons))
	}
	if reconnects > 0 {
		t.Errorf("a hostile reply_to cost the worker its broker connection %d times", reconnects)
	}
}
