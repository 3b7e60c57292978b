package itest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"testing"
	"time"
)

// ManagementURL is the shared broker's management API
// (RABBITMQ_MANAGEMENT_URL, default http://guest:guest@127.0.0.1:15672;
// `make rabbitmq` enables the plugin).
func ManagementURL() string {
	if u := os.Getenv("RABBITMQ_MANAGEMENT_URL"); u != "" {
		return u
	}
	return "http://guest:guest@127.0.0.1:15672"
}

// CloseConnections closes, from the broker's side, every connection whose
// client-provided connection_name is name, as an operator does from the
// management UI: the broker sends connection.close (320 CONNECTION_FORCED)
// and drops the socket. It waits up to within for the management API to
// list such a connection (its statistics lag a few seconds behind a new
// connection) and returns how many it closed; it fails t when there was
// none.
func CloseConnections(t testing.TB, name string, within time.Duration) int {
	t.Helper()
	client := &http.Client{Timeout: 5 * time.Second}
	var names []string
	WaitUntil(t, within, "the management API to list connection "+name, func() bool {
		names = connectionsNamed(t, client, name)
		return len(names) > 0
	})
	for _, n := range names {
		req, err := http.NewRequest(http.MethodDelete, ManagementURL()+"/api/connections/"+url.PathEscape(n), nil)
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("X-Reason", "closed by a sous test")
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("management API: close connection %s: %v", n, err)
		}
		resp.Body.Close()
		if resp.StatusCode/100 != 2 && resp.StatusCode != http.StatusNotFound {
			t.Fatalf("management API: close connection %s: %s", n, resp.Status)
		}
	}
	return len(names)
}

// WaitConnection waits up to within for the management API to list a
// connection named name (its statistics lag a few seconds behind a new
// connection), so that a later CloseConnections acts at once.
func WaitConnection(t testing.TB, name string, within time.Duration) {
	t.Helper()
	client := &http.Client{Timeout: 5 * time.Second}
	WaitUntil(t, within, "the management API to list connection "+name, func() bool {
		return len(connectionsNamed(t, client, name)) > 0
	})
}

func connectionsNamed(t testing.TB, client *http.Client, name string) []string {
	t.Helper()
	resp, err := client.Get(ManagementURL() + "/api/connections?columns=name,client_properties.connection_name")
	if err != nil {
		t.Fatalf("management API (rabbitmq-plugins enable rabbitmq_management): %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("management API: GET /api/connections: %s", resp.Status)
	}
	var conns []struct {
		Name  string `json:"name"`
		Props struct {
			ConnectionName string `json:"connection_name"`
		} `json:"client_properties"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&conns); err != nil {
		t.Fatalf("management API: GET /api/connections: %v", fmt.Errorf("decode: %w", err))
	}
	var out []string
	for _, c := range conns {
		if c.Props.ConnectionName == name {
			out = append(out, c.Name)
		}
	}
	return out
}

// ConsumerPrefetch waits up to within for the management API to list
// exactly one consumer on queue q with a prefetch other than skip, and
// returns that consumer's prefetch_count as the broker applies it (0 means
// unlimited). It fails t when there is none.
func ConsumerPrefetch(t testing.TB, q string, skip int, within time.Duration) int {
	t.Helper()
	client := &http.Client{Timeout: 5 * time.Second}
	got := -1
	WaitUntil(t, within, "the management API to list a consumer on "+q, func() bool {
		resp, err := client.Get(ManagementURL() + "/api/consumers")
		if err != nil {
			t.Fatalf("management API (rabbitmq-plugins enable rabbitmq_management): %v", err)
		}
		defer resp.Body.Close()
		var cs []struct {
			Prefetch int `json:"prefetch_count"`
			Queue    struct {
				Name string `json:"name"`
			} `json:"queue"`
		}
		if err := json.NewDecoder(resp.Body).Decode(&cs); err != nil {
			t.Fatalf("management API: GET /api/consumers: %v", err)
		}
		var mine []int
		for _, c := range cs {
			if c.Queue.Name == q {
				mine = append(mine, c.Prefetch)
			}
		}
		if len(mine) == 1 && mine[0] != skip {
			got = mine[0]
			return true
		}
		return false
	})
	return got
}

// CreateUser creates a user on the shared broker with the given password
// and permissions on the vhost "/" (regular expressions; "" for no
// permissions at all), deleted when t ends.
func CreateUser(t testing.TB, user, password string, perms *Permissions) {
	t.Helper()
	SetPassword(t, user, password)
	t.Cleanup(func() { mgmt(t, http.MethodDelete, "/api/users/"+url.PathEscape(user), nil) })
	if perms != nil {
		mgmt(t, http.MethodPut, "/api/permissions/%2F/"+url.PathEscape(user), perms)
	}
}

// Permissions are a user's configure, write and read patterns on a vhost.
type Permissions struct {
	Configure string `json:"configure"`
	Write     string `json:"write"`
	Read      string `json:"read"`
}

// SetPassword creates user, or changes its password.
func SetPassword(t testing.TB, user, password string) {
	t.Helper()
	mgmt(t, http.MethodPut, "/api/users/"+url.PathEscape(user), map[string]string{"password": password, "tags": ""})
}

// mgmt sends one management API request with a JSON body and fails t
// unless it succeeds.
func mgmt(t testing.TB, method, path string, body any) {
	t.Helper()
	var r io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			t.Fatal(err)
		}
		r = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, ManagementURL()+path, r)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Do(req)
	if err != nil {
		t.Fatalf("management API (rabbitmq-plugins enable rabbitmq_management): %s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		t.Fatalf("management API: %s %s: %s %s", method, path, resp.Status, msg)
	}
}
