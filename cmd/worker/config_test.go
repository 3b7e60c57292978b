package main

import (
	"errors"
	"github.com/sous-run/sous/internal/queue/rabbitmq"
	"github.com/sous-run/sous/internal/worker"
	"os"
	"strings"
	"testing"
	"time"
)

func TestLoadConfigDefaults(t *testing.T) {
	t.Parallel()
	c, err := loadConfig([]string{"SOUS_MODEL=llama3.2"})
	if err != nil {
		t.Fatal(err)
	}
	if c.Queue != "sous.requests" || c.ResultsQueue != "sous.results" || c.DeadLetterQueue != "sous.requests.dlq" ||
		c.MaxAttempts != 5 || c.MaxBodyBytes != 1<<20 || c.DrainTimeout != 25*time.Second || c.HTTPAddr != ":8080" ||
		c.Broker != "rabbitmq" || c.Engine != "ollama" || c.EngineURL != "http://localhost:11434" || !c.Declare {
		t.Fatalf("defaults: %+v", c)
	}
	if got := allowedModels(c); len(got) != 1 || got[0] != "llama3.2" {
		t.Fatalf("allowed models default to SOUS_MODEL: %v", got)
	}
}

func TestInvalidConfigNamesTheVariable(t *testing.T) {
	t.Parallel()
	tests := []struct {
		env  []string
		name string
	}{
		{[]string{"SOUS_BATCH_MAX=lots"}, "SOUS_BATCH_MAX"},
		{[]string{"SOUS_BATCH_WAIT=soon"}, "SOUS_BATCH_WAIT"},
		{[]string{"SOUS_DECLARE=maybe"}, "SOUS_DECLARE"},
		{[]string{"SOUS_BATCH_MIN=8", "SOUS_BATCH_MAX=4"}, "SOUS_BATCH_MIN"},
		{[]string{"SOUS_MAX_ATTEMPTS=0"}, "SOUS_MAX_ATTEMPTS"},
		{[]string{"SOUS_AMQP_URL=http://x"}, "SOUS_AMQP_URL"},
		{[]string{"SOUS_ENGINE=tgi"}, "SOUS_ENGINE"},
		{[]string{"SOUS_ENGINE_URL=localhost"}, "SOUS_ENGINE_URL"},
		{[]string{"SOUS_BROKER=servicebus"}, "SOUS_SERVICEBUS_CONNECTION_STRING"},
		{[]string{"SOUS_LOG_LEVEL=loud"}, "SOUS_LOG_LEVEL"},
		{[]string{"SOUS_HTTP_ADDR=8080"}, "SOUS_HTTP_ADDR"},
		{[]string{"SOUS_ENGINE_BATCH_PROMPTS=some"}, "SOUS_ENGINE_BATCH_PROMPTS"},
		{[]string{"SOUS_GPU_DEVICES=0,,x"}, "SOUS_GPU_DEVICES"},
		{[]string{"SOUS_AMQP_URL_FILE=/nonexistent/secret"}, "SOUS_AMQP_URL_FILE"},
		{[]string{"SOUS_QUEUE=q", "SOUS_DEAD_LETTER_QUEUE=q"}, "SOUS_DEAD_LETTER_QUEUE"},
	}
	for _, tt := range tests {
		_, err := loadConfig(append([]string{"SOUS_MODEL=m"}, tt.env...))
		if err == nil {
			t.Errorf("%v: accepted", tt.env)
			continue
		}
		if !strings.Contains(err.Error(), tt.name) {
			t.Errorf("%v: error %q does not name %s", tt.env, err, tt.name)
		}
	}
	if _, err := loadConfig(nil); err == nil || !strings.Contains(err.Error(), "SOUS_MODEL") {
		t.Errorf("missing SOUS_MODEL: %v", err)
	}
}

func TestSecretsStayOutOfConfigErrors(t *testing.T) {
	t.Parallel()
	_, err := loadConfig([]string{"SOUS_MODEL=m", "SOUS_AMQP_URL=ftp://user:hunter2@host/"})
	var ce *configError
	if !errors.As(err, &ce) || strings.Contains(err.Error(), "hunter2") {
		t.Fatalf("error %v", err)
	}
}

func TestSecretFromFile(t *testing.T) {
	t.Parallel()
	f := t.TempDir() + "/url"
	if err := os.WriteFile(f, []byte("amqps://u:fromfile@broker:5671/\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := loadConfig([]string{"SOUS_MODEL=m", "SOUS_AMQP_URL_FILE=" + f})
	if err != nil {
		t.Fatal(err)
	}
	if c.AMQPURL.Reveal() != "amqps://u:fromfile@broker:5671/" {
		t.Fatalf("got %q", c.AMQPURL.Reveal())
	}
}

func TestAllowedModelsAreTrimmedAndIncludeTheDefault(t *testing.T) {
	t.Parallel()
	c, err := loadConfig([]string{"SOUS_MODEL=llama3.2", "SOUS_MODELS_ALLOWED=qwen2.5, mistral"})
	if err != nil {
		t.Fatal(err)
	}
	if got := allowedModels(c); strings.Join(got, "|") != "llama3.2|qwen2.5|mistral" {
		t.Fatalf("allowed %q", got)
	}
	if _, err := loadConfig([]string{"SOUS_MODEL=m", "SOUS_MODELS_ALLOWED=a,,b"}); err == nil || !strings.Contains(err.Error(), "SOUS_MODELS_ALLOWED") {
		t.Fatalf("empty entry: %v", err)
	}
}

// The worker's prefetch must fit AMQP's 16-bit prefetch count: 4096 ×
// (14 + 2) = 65,536 went out as 0, which RabbitMQ reads as unlimited. The
// prefetch is now worker.Capacity of the in-flight limit, at most 3 ×
// SOUS_BATCH_MAX =
// 12,288; the configuration that wrapped is accepted and fits, and the
// largest SOUS_BATCH_MAX is refused.
func TestPrefetchFitsTheAMQPLimit(t *testing.T) {
	t.Parallel()
	cfg, err := loadConfig([]string{"SOUS_MODEL=m", "SOUS_BATCH_MAX=4096", "SOUS_ENGINE_PARALLEL=4096", "SOUS_BATCH_CONCURRENCY=14"})
	if err != nil {
		t.Fatalf("refused: %v", err)
	}
	if pf := worker.Capacity(cfg.BatchMax); pf != 12288 || pf > rabbitmq.MaxPrefetch {
		t.Fatalf("prefetch %d at SOUS_BATCH_MAX=4096", pf)
	}
	_, err = loadConfig([]string{"SOUS_MODEL=m", "SOUS_BATCH_MAX=30000"})
	var ce *configError
	if !errors.As(err, &ce) || !strings.Contains(err.Error(), "SOUS_BATCH_MAX") {
		t.Fatalf("SOUS_BATCH_MAX=30000: %v, want a configError naming it", err)
	}
}
