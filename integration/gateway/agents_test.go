package gateway

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/sous-run/sous/integration/itest"
	"github.com/sous-run/sous/integration/ollamatest"
	"github.com/sous-run/sous/internal/queue/servicebus/sbpeer"
	"github.com/sous-run/sous/internal/tinymodel"
)

// scriptedModels lets the worker and the gateway serve the scripted model.
const scriptedModels = "SOUS_MODELS_ALLOWED=" + ollamatest.EndlessModelName + "," + ollamatest.ScriptedModelName

// runNode runs a script in node/ against the gateway at api, with the
// scripted model's questions and answers in its environment, and checks
// that every scenario in want reported ok.
func runNode(t *testing.T, api, script string, want []string, env ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "node", script)
	cmd.Dir = "node"
	cmd.Env = append(append(os.Environ(),
		"BASE_URL="+api+"/v1", "API_KEY="+apiKey, "MODEL="+ollamatest.ScriptedModelName,
		"WEATHER_Q="+tinymodel.WeatherQuestion, "WEATHER_CALL="+tinymodel.WeatherToolCall,
		"WEATHER_RESULT="+tinymodel.WeatherToolResult, "WEATHER_A="+tinymodel.WeatherAnswer,
		"PARALLEL_Q="+tinymodel.ParallelQuestion, "PARALLEL_RESULT="+tinymodel.ParallelToolResult,
		"PARALLEL_A="+tinymodel.ParallelAnswer,
		// The frameworks, unchanged but for where they send requests and
		// with what key: OpenAI's own environment variables.
		"OPENAI_BASE_URL="+api+"/v1", "OPENAI_API_KEY="+apiKey, "OPENAI_AGENTS_DISABLE_TRACING=1",
		"LANGSMITH_TRACING=false",
	), env...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("node %s: %v\nstdout:\n%s\nstderr:\n%s", script, err, out, itest.Tail(stderr.String(), 30))
	}
	got := map[string]map[string]any{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		var r map[string]any
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatalf("%s output %q: %v", script, line, err)
		}
		name, _ := r["name"].(string)
		got[name] = r
	}
	for _, name := range want {
		r, ok := got[name]
		switch {
		case !ok:
			t.Errorf("%s: no result", name)
		case r["ok"] != true:
			t.Errorf("%s failed: %v", name, r)
		default:
			t.Logf("%s: %v", name, r)
		}
	}
}

var toolScenarios = []string{"tool_round_trip", "tool_stream", "parallel_tool_calls", "tool_choice", "json_output", "bad_tool_input",
	"responses_round_trip", "responses_stream", "responses_refused"}

// TestToolsNodeClient: tools, tool calls (parallel, streamed), tool_choice,
// JSON output and bad tool input with the official OpenAI Node client,
// through the gateway, RabbitMQ, the worker and the dev Ollama's scripted
// model, asserting its exact answers.
func TestToolsNodeClient(t *testing.T) {
	t.Parallel()
	q := queueName(t, "")
	startWorker(t, q, scriptedModels)
	gw := startGateway(t, q, scriptedModels)
	runNode(t, gw.api, "tools.mjs", toolScenarios)
}

// TestToolsServiceBus: the same scenarios, and both agent frameworks, with
// the gateway and the worker on Service Bus (sbpeer).
func TestToolsServiceBus(t *testing.T) {
	t.Parallel()
	p := sbpeer.Start(t, sbpeer.Options{})
	p.RequireSessions("sous.replies")
	sb := []string{"SOUS_BROKER=servicebus", "SOUS_SERVICEBUS_CONNECTION_STRING=" + p.ConnectionString(), scriptedModels}
	startWorker(t, "sous.requests", sb...)
	gw := startGateway(t, "sous.requests", append(sb, "SOUS_GATEWAY_REPLY_QUEUE=sous.replies")...)
	runNode(t, gw.api, "tools.mjs", toolScenarios)
	runNode(t, gw.api, "langchain.mjs", langchainScenarios)
	runNode(t, gw.api, "agents.mjs", agentsScenarios)
}

var (
	langchainScenarios = []string{"langchain_agent", "langchain_parallel", "langchain_agent_stream", "langchain_parallel_stream"}
	agentsScenarios    = []string{"agents_sdk", "agents_sdk_parallel", "agents_sdk_stream", "agents_sdk_parallel_stream"}
)

// TestAgentFrameworks: real agent frameworks, unchanged but for the base
// URL and the key, run a tool-using agent to the scripted model's exact
// answer through the gateway, RabbitMQ, the worker and the dev Ollama:
// LangChain.js (langchain's createAgent on @langchain/openai's ChatOpenAI,
// chat completions) and the OpenAI Agents SDK (@openai/agents, on its
// default, the Responses API), each plain and streamed, one tool call and
// two in parallel.
func TestAgentFrameworks(t *testing.T) {
	t.Parallel()
	q := queueName(t, "")
	startWorker(t, q, scriptedModels)
	gw := startGateway(t, q, scriptedModels)
	t.Run("langchain", func(t *testing.T) {
		runNode(t, gw.api, "langchain.mjs", langchainScenarios)
	})
	t.Run("openai-agents", func(t *testing.T) {
		runNode(t, gw.api, "agents.mjs", agentsScenarios)
	})
	// Each framework went where it should: LangChain to chat completions,
	// the Agents SDK to the Responses API, every answer a 200.
	_, metrics := gw.GetBody("/metrics")
	for _, route := range []string{"/v1/chat/completions", "/v1/responses"} {
		if !strings.Contains(metrics, `http_response_status_code="200",http_route="`+route+`"`) {
			t.Errorf("/metrics counts no 200 on %s", route)
		}
	}
	if strings.Contains(metrics, `http_response_status_code="4`) || strings.Contains(metrics, `http_response_status_code="5`) {
		t.Errorf("an agent's request failed:\n%s", metrics)
	}
}
