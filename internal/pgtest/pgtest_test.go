package pgtest_test

import (
	"context"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/sous-run/sous/internal/pgtest"
)

func query(t *testing.T, url, q string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatalf("connect %s: %v", url, err)
	}
	defer conn.Close(ctx)
	var s string
	if err := conn.QueryRow(ctx, q).Scan(&s); err != nil {
		t.Fatalf("%s: %v", q, err)
	}
	return s
}

func TestStart(t *testing.T) {
	var addr string
	t.Run("server", func(t *testing.T) {
		url := pgtest.Start(t)
		cfg, err := pgx.ParseConfig(url)
		if err != nil {
			t.Fatal(err)
		}
		if cfg.Host != "127.0.0.1" || cfg.Port == 5432 {
			t.Fatalf("url %s: want 127.0.0.1 and not the system port 5432", url)
		}
		addr = net.JoinHostPort(cfg.Host, strconv.Itoa(int(cfg.Port)))
		for q, want := range map[string]string{
			"SELECT current_database()": "test",
			"SHOW listen_addresses":     "127.0.0.1",
			"SHOW fsync":                "off",
		} {
			if got := query(t, url, q); got != want {
				t.Errorf("%s = %q, want %q", q, got, want)
			}
		}
		other := pgtest.Database(t, url)
		if got := query(t, other, "SELECT current_database()"); got == "test" || !strings.HasPrefix(got, "db") {
			t.Errorf("Database gave database %q", got)
		}
	})
	if addr == "" {
		return // skipped
	}
	// The subtest's cleanup stopped the server and waited for it to exit.
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err == nil {
		conn.Close()
		t.Fatalf("%s still accepts connections after the test ended", addr)
	}
}
