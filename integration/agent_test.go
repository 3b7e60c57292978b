package integration

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/sous-run/sous/integration/ollamatest"
	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/tinymodel"
	"github.com/sous-run/sous/internal/wire"
)

// weatherTool is the tool the scripted model calls.
const weatherTool = `{"type":"function","function":{"name":"get_weather","description":"Get the current weather for a city","parameters":{"type":"object","required":["city"],"properties":{"city":{"type":"string","description":"the city"}}}}}`

// scriptedEngines are the two engine drivers, each against the real
// Ollama with the scripted model: its own API, and its OpenAI-compatible
// /v1.
var scriptedEngines = []struct {
	name string
	env  []string
}{
	{"ollama", []string{"SOUS_ENGINE=ollama"}},
	{"openai", []string{"SOUS_ENGINE=openai"}},
}

func startScriptedWorker(t *testing.T, q string, env ...string) *workerProc {
	t.Helper()
	return startWorker(t, q, append([]string{"SOUS_MODEL=" + ollamatest.ScriptedModelName}, env...)...)
}

// roundTrip publishes body and returns its result from replies.
func (c *client) roundTrip(q, replies, id, body string) wire.Result {
	c.t.Helper()
	c.publish(q, id, replies, body)
	got := c.collect(replies, 1, 60*time.Second)
	d, ok := got[id]
	if !ok {
		c.t.Fatalf("a result for another request: %v", got)
	}
	return decodeResult(c.t, d)
}

// TestAgentLoopEndToEnd runs the two turns of an agent loop through
// RabbitMQ, the worker and the real Ollama with the scripted model, for
// both engine drivers: the model asks for get_weather, the producer runs it
// and publishes the conversation with the tool's answer, the model answers.
// Both answers are exact.
func TestAgentLoopEndToEnd(t *testing.T) {
	t.Parallel()
	for _, eng := range scriptedEngines {
		t.Run(eng.name, func(t *testing.T) {
			t.Parallel()
			q, _ := names(t)
			startScriptedWorker(t, q, eng.env...)
			c := newClient(t)
			replies := q + ".replies"
			c.declare(replies)

			user := fmt.Sprintf(`{"role":"user","content":%q}`, tinymodel.WeatherQuestion)
			first := c.roundTrip(q, replies, "turn-1", `{"messages":[`+user+`],"tools":[`+weatherTool+`],"tool_choice":"auto"}`)
			if first.Status != wire.StatusOK || first.Message == nil {
				t.Fatalf("first turn: %+v", first)
			}
			m := first.Message
			if len(m.ToolCalls) != 1 || m.Content != "" || first.DoneReason != inference.DoneToolCalls {
				t.Fatalf("first turn: message %+v, done_reason %q: want exactly one tool call", m, first.DoneReason)
			}
			call := m.ToolCalls[0]
			if call.Function.Name != tinymodel.WeatherTool || string(call.Function.Arguments) != `{"city":"Paris"}` || call.Type != "function" || call.ID == "" {
				t.Fatalf("tool call %+v (arguments %s), want get_weather {\"city\":\"Paris\"} with an id", call, call.Function.Arguments)
			}

			// The producer runs the tool and sends the conversation back.
			assistant, _ := json.Marshal(m)
			tool := fmt.Sprintf(`{"role":"tool","tool_call_id":%q,"content":%q}`, call.ID, tinymodel.WeatherToolResult)
			second := c.roundTrip(q, replies, "turn-2", `{"messages":[`+user+`,`+string(assistant)+`,`+tool+`],"tools":[`+weatherTool+`]}`)
			if second.Status != wire.StatusOK || second.Message == nil {
				t.Fatalf("second turn: %+v", second)
			}
			if second.Message.Content != tinymodel.WeatherAnswer || len(second.Message.ToolCalls) != 0 || second.DoneReason != "stop" {
				t.Fatalf("second turn: %+v (%s), want %q", second.Message, second.DoneReason, tinymodel.WeatherAnswer)
			}
		})
	}
}

// stream publishes a streamed request and returns its chunks and result.
func (c *client) stream(q, replies, id, body string) ([]wire.Chunk, wire.Result) {
	c.t.Helper()
	ch, err := c.conn.Channel()
	if err != nil {
		c.t.Fatal(err)
	}
	defer ch.Close()
	ds, err := ch.Consume(replies, "", true, false, false, false, nil)
	if err != nil {
		c.t.Fatal(err)
	}
	c.publish(q, id, replies, body)
	var chunks []wire.Chunk
	timeout := time.After(60 * time.Second)
	for {
		var d amqp.Delivery
		select {
		case d = <-ds:
		case <-timeout:
			c.t.Fatalf("no result for %s within 60s (%d chunks)", id, len(chunks))
		}
		if d.CorrelationId != id {
			continue
		}
		if d.Headers["x-sous-status"] != "chunk" {
			return chunks, decodeResult(c.t, d)
		}
		var k wire.Chunk
		if err := json.Unmarshal(d.Body, &k); err != nil {
			c.t.Fatalf("chunk: %v: %s", err, d.Body)
		}
		chunks = append(chunks, k)
	}
}

// TestScriptedStreamReassembles: the chunks of a streamed answer put
// together are exactly the scripted answer and the final result's text,
// through both engines.
func TestScriptedStreamReassembles(t *testing.T) {
	t.Parallel()
	for _, eng := range scriptedEngines {
		t.Run(eng.name, func(t *testing.T) {
			t.Parallel()
			q, _ := names(t)
			// Small chunks: every delta its own chunk, so there are several.
			startScriptedWorker(t, q, append(eng.env, "SOUS_STREAM_BYTES=1", "SOUS_STREAM_INTERVAL=1ms")...)
			c := newClient(t)
			replies := q + ".replies"
			c.declare(replies)
			for _, tc := range []struct{ id, body, want string }{
				{"gen", fmt.Sprintf(`{"prompt":%q,"stream":true}`, tinymodel.SkyQuestion), tinymodel.SkyAnswer},
				{"chat", fmt.Sprintf(`{"messages":[{"role":"user","content":%q}],"stream":true}`, tinymodel.CountQuestion), tinymodel.CountAnswer},
			} {
				chunks, res := c.stream(q, replies, tc.id, tc.body)
				var text strings.Builder
				for i, k := range chunks {
					if k.Seq != i {
						t.Errorf("%s: chunk %d has seq %d", tc.id, i, k.Seq)
					}
					text.WriteString(k.Delta)
				}
				final := ""
				if res.Response != nil {
					final = *res.Response
				} else if res.Message != nil {
					final = res.Message.Content
				}
				if text.String() != tc.want || final != tc.want || len(chunks) < 2 || res.Done == nil || !*res.Done {
					t.Errorf("%s: %d chunks %q, final %q (done %v), want %q in several chunks", tc.id, len(chunks), text.String(), final, res.Done, tc.want)
				}
			}
		})
	}
}

// TestScriptedNoMixUps: many scripted questions at once, batched by the
// worker; each result holds its own question's answer.
func TestScriptedNoMixUps(t *testing.T) {
	t.Parallel()
	q, _ := names(t)
	c := newClient(t)
	replies := q + ".replies"
	c.declare(replies)
	qa := [][2]string{
		{tinymodel.SkyQuestion, tinymodel.SkyAnswer},
		{tinymodel.QueueQuestion, tinymodel.QueueAnswer},
		{tinymodel.CountQuestion, tinymodel.CountAnswer},
		{tinymodel.WeatherQuestion, tinymodel.WeatherToolCall},
		{"Something unscripted.", tinymodel.FallbackAnswer},
	}
	// The same options for all; the engine is held until the worker has
	// taken more than its 8 slots' worth, so 8 requests are on the engine
	// at once (each its own call: Ollama batches them inside).
	gate := newGate(t, ollama.URL())
	startScriptedWorker(t, q, "SOUS_ENGINE_URL="+gate.url, "SOUS_BATCH_MAX=8", "SOUS_ENGINE_PARALLEL=8")
	const n = 40
	for i := range n {
		c.publish(q, fmt.Sprint("m", i), replies, fmt.Sprintf(`{"prompt":%q,"options":{"temperature":1}}`, qa[i%len(qa)][0]))
	}
	waitUntil(t, 30*time.Second, "the worker to take 9 requests", func() bool { return c.depth(q) <= n-9 })
	gate.release()
	got := c.collect(replies, n, 2*time.Minute)
	for i := range n {
		r := decodeResult(t, got[fmt.Sprint("m", i)])
		if r.Status != wire.StatusOK || r.Response == nil || *r.Response != qa[i%len(qa)][1] {
			t.Errorf("m%d (%q): %+v, want %q", i, qa[i%len(qa)][0], r, qa[i%len(qa)][1])
		}
	}
	if p := gate.peak.Load(); p < 2 {
		t.Errorf("at most %d request on the engine at once: nothing was checked for mix-ups", p)
	}
}

// TestSousctlAgentLoop: sousctl runs the loop itself: -tools offers
// get_weather, -tool-answer answers it, and the final text is printed.
func TestSousctlAgentLoop(t *testing.T) {
	t.Parallel()
	q, _ := names(t)
	startScriptedWorker(t, q)
	tools := filepath.Join(t.TempDir(), "tools.json")
	if err := os.WriteFile(tools, []byte("["+weatherTool+"]"), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(filepath.Join(binDir, "sousctl"), "publish", "-url", brokerURL, "-queue", q,
		"-tools", tools, "-tool-answer", tinymodel.WeatherTool+"="+tinymodel.WeatherToolResult, tinymodel.WeatherQuestion).CombinedOutput()
	if err != nil {
		t.Fatalf("sousctl: %v\n%s", err, out)
	}
	for _, want := range []string{
		`tool call: get_weather({"city":"Paris"})`,
		`→ get_weather answers "sunny"`,
		"assistant: " + tinymodel.WeatherAnswer,
		"done=tool_calls",
		"done=stop",
	} {
		if !strings.Contains(string(out), want) {
			t.Errorf("sousctl output lacks %q:\n%s", want, out)
		}
	}
}

// TestScriptedAnswerAfterRedelivery: a worker killed while the engine holds
// its batch loses nothing; the redelivered requests are answered by the
// next worker with exactly their scripts, on attempt 2.
func TestScriptedAnswerAfterRedelivery(t *testing.T) {
	t.Parallel()
	q, _ := names(t)
	c := newClient(t)
	replies := q + ".replies"
	c.declare(replies)
	gate := newGate(t, ollama.URL())
	first := startScriptedWorker(t, q, "SOUS_ENGINE_URL="+gate.url)
	c.publish(q, "plain", replies, fmt.Sprintf(`{"prompt":%q}`, tinymodel.SkyQuestion))
	c.publish(q, "tool", replies, fmt.Sprintf(`{"messages":[{"role":"user","content":%q}],"tools":[%s]}`, tinymodel.WeatherQuestion, weatherTool))
	waitUntil(t, 30*time.Second, "the worker to take both requests", func() bool { return c.depth(q) == 0 })
	first.Kill()
	waitUntil(t, 30*time.Second, "the broker to take the requests back", func() bool { return c.depth(q) == 2 })
	if n := c.depth(replies); n != 0 {
		t.Fatalf("%d replies before any engine answered", n)
	}

	startScriptedWorker(t, q)
	got := c.collect(replies, 2, 60*time.Second)
	plain, tool := decodeResult(t, got["plain"]), decodeResult(t, got["tool"])
	if plain.Response == nil || *plain.Response != tinymodel.SkyAnswer || plain.Attempt != 2 {
		t.Errorf("plain: %s, want %q on attempt 2", got["plain"].Body, tinymodel.SkyAnswer)
	}
	if tool.Message == nil || len(tool.Message.ToolCalls) != 1 || tool.Message.ToolCalls[0].Function.Name != tinymodel.WeatherTool ||
		string(tool.Message.ToolCalls[0].Function.Arguments) != `{"city":"Paris"}` || tool.Attempt != 2 {
		t.Errorf("tool: %s, want the get_weather call on attempt 2", got["tool"].Body)
	}
}
