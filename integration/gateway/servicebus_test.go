package gateway

import (
	"bufio"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/sous-run/sous/integration/itest"
	"github.com/sous-run/sous/integration/ollamatest"
	"github.com/sous-run/sous/internal/queue/servicebus/sbpeer"
	"github.com/sous-run/sous/internal/tinymodel"
)

// postChat sends a chat completion to the gateway and returns the response.
func postChat(t *testing.T, api, body string) *http.Response {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, api+"/v1/chat/completions", strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+apiKey)
	req.Header.Set("Content-Type", "application/json")
	resp, err := (&http.Client{Timeout: 2 * time.Minute}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	return resp
}

// TestServiceBus: the gateway on Azure Service Bus's request/reply
// pattern, through sbpeer (the project's AMQP 1.0 test double for Service
// Bus, driven by the real azservicebus SDK on both sides) and the worker
// on the same peer, to the real Ollama's scripted model: a chat completion
// and a streamed chat whose chunks come back in order in the gateway's
// reply session; a full request queue is a 429, no answer in time a 504,
// the broker gone a 503.
func TestServiceBus(t *testing.T) {
	t.Parallel()
	p := sbpeer.Start(t, sbpeer.Options{})
	p.RequireSessions("sous.replies")
	models := "SOUS_MODELS_ALLOWED=" + ollamatest.EndlessModelName + "," + ollamatest.ScriptedModelName
	sb := []string{"SOUS_BROKER=servicebus", "SOUS_SERVICEBUS_CONNECTION_STRING=" + p.ConnectionString(), models}
	// One chunk per token: many chunks to keep in order.
	startWorker(t, "sous.requests", append(sb, "SOUS_STREAM_BYTES=1", "SOUS_STREAM_INTERVAL=1ms")...)
	gw := startGateway(t, "sous.requests", append(sb, "SOUS_GATEWAY_REPLY_QUEUE=sous.replies", "SOUS_GATEWAY_CHANNELS=2")...)

	chat := `{"model":"` + ollamatest.ScriptedModelName + `","messages":[{"role":"user","content":"` + tinymodel.SkyQuestion + `"}]`
	resp := postChat(t, gw.api, chat+`}`)
	var out struct {
		Choices []struct {
			Message struct{ Content string } `json:"message"`
		} `json:"choices"`
		Usage struct {
			CompletionTokens int `json:"completion_tokens"`
		} `json:"usage"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("chat completion: %d %v", resp.StatusCode, err)
	}
	if len(out.Choices) != 1 || out.Choices[0].Message.Content != tinymodel.SkyAnswer || out.Usage.CompletionTokens == 0 {
		t.Fatalf("chat completion %+v, want %q with usage", out, tinymodel.SkyAnswer)
	}

	resp = postChat(t, gw.api, chat+`,"stream":true}`)
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
		t.Fatalf("stream: %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	var text strings.Builder
	deltas, done := 0, false
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		data, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok {
			continue
		}
		if data == "[DONE]" {
			done = true
			break
		}
		var ev struct {
			Choices []struct {
				Delta struct{ Content string } `json:"delta"`
			} `json:"choices"`
			Error any `json:"error"`
		}
		if err := json.Unmarshal([]byte(data), &ev); err != nil || ev.Error != nil {
			t.Fatalf("event %s: %v", data, err)
		}
		if len(ev.Choices) == 1 && ev.Choices[0].Delta.Content != "" {
			deltas++
			text.WriteString(ev.Choices[0].Delta.Content)
		}
	}
	if !done || text.String() != tinymodel.SkyAnswer || deltas < 5 {
		t.Fatalf("streamed %d deltas, [DONE] %v: %q, want %q in order", deltas, done, text.String(), tinymodel.SkyAnswer)
	}

	// What went over the peer: requests with the reply queue and one of the
	// gateway's sessions; chunks and results in that session, received and
	// deleted.
	reqs := p.Find(func(e sbpeer.Event) bool { return e.Name == "enqueued" && e.Queue == "sous.requests" })
	if len(reqs) != 2 {
		t.Fatalf("%d requests enqueued, want 2", len(reqs))
	}
	streamed := 0
	for _, r := range reqs {
		if r.ReplyTo != "sous.replies" || r.ReplyToSessionID == "" || r.CorrelationID != r.MessageID {
			t.Errorf("request %s", r)
		}
		replies := p.Find(func(e sbpeer.Event) bool {
			return e.Name == "enqueued" && e.Queue == "sous.replies" && e.CorrelationID == r.CorrelationID
		})
		if len(replies) == 0 {
			t.Errorf("request %s: no reply", r.MessageID)
		}
		streamed = max(streamed, len(replies))
		for _, rep := range replies {
			if rep.SessionID != r.ReplyToSessionID {
				t.Errorf("reply in session %q, the request named %q", rep.SessionID, r.ReplyToSessionID)
			}
		}
	}
	if streamed < deltas {
		t.Errorf("the streamed request had %d replies for %d deltas", streamed, deltas)
	}
	itest.WaitUntil(t, 10*time.Second, "the reply queue to be empty", func() bool {
		s := p.Stats()["sous.replies"]
		return s.Available == 0 && s.Locked == 0
	})

	// A full request queue (amqp:resource-limit-exceeded) is a 429; a
	// request that no worker answers in time is a 504.
	p.SetMaxMessages("sous.full", 1)
	full := startGateway(t, "sous.full", append(sb, "SOUS_GATEWAY_REPLY_QUEUE=sous.replies", "SOUS_GATEWAY_TIMEOUT=2s")...)
	if resp := postChat(t, full.api, chat+`}`); resp.StatusCode != http.StatusGatewayTimeout {
		b, _ := io.ReadAll(resp.Body)
		t.Errorf("no worker: %d %s, want 504", resp.StatusCode, b)
	}
	if resp := postChat(t, full.api, chat+`}`); resp.StatusCode != http.StatusTooManyRequests || resp.Header.Get("Retry-After") == "" {
		b, _ := io.ReadAll(resp.Body)
		t.Errorf("full queue: %d %s (Retry-After %q), want 429", resp.StatusCode, b, resp.Header.Get("Retry-After"))
	}

	// The broker gone: not ready, and a 503.
	p.Stop()
	itest.WaitUntil(t, 30*time.Second, "/readyz to fail", func() bool { return gw.Get("/readyz") == http.StatusServiceUnavailable })
	if resp := postChat(t, gw.api, chat+`}`); resp.StatusCode != http.StatusServiceUnavailable {
		b, _ := io.ReadAll(resp.Body)
		t.Errorf("broker gone: %d %s, want 503", resp.StatusCode, b)
	}
	if strings.Contains(gw.Logs(), sbpeer.Key) || strings.Contains(gw.Logs(), apiKey) {
		t.Error("a secret in the gateway's log")
	}
}
