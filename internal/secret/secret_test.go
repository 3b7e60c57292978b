package secret_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"testing"

	"github.com/sous-run/sous/internal/secret"
)

func TestValueNeverPrints(t *testing.T) {
	t.Parallel()
	v := secret.Value("amqp://user:hunter2@host:5672/")
	var buf bytes.Buffer
	log := slog.New(slog.NewJSONHandler(&buf, nil))
	log.Info("connect", "url", v, "struct", struct{ URL secret.Value }{v})
	j, _ := json.Marshal(struct{ URL secret.Value }{v})
	out := buf.String() + fmt.Sprint(v) + fmt.Sprintf("%v %+v %#v %s", v, v, v, v) + string(j)
	if strings.Contains(out, "hunter2") {
		t.Fatalf("secret leaked: %s", out)
	}
	if v.Reveal() != "amqp://user:hunter2@host:5672/" {
		t.Fatal("Reveal lost the value")
	}
}

func TestURL(t *testing.T) {
	t.Parallel()
	tests := map[string]string{
		"amqp://guest:guest@localhost:5672/":  "amqp://guest:xxxxx@localhost:5672/",
		"amqps://u:p%40ss@h/vh?cacertfile=/x": "amqps://u:xxxxx@h/vh?redacted",
		"http://localhost:11434":              "http://localhost:11434",
		"not a url":                           "[REDACTED]",
	}
	for in, want := range tests {
		if got := secret.URL(in); got != want {
			t.Errorf("URL(%q) = %q, want %q", in, got, want)
		}
	}
	if got := secret.Scrub("dial amqp://u:hunter2@h failed", "hunter2"); strings.Contains(got, "hunter2") {
		t.Errorf("Scrub left the secret: %s", got)
	}
}
