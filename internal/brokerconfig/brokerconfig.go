// Package brokerconfig checks the broker settings the worker and the
// gateway both read from their environment (SOUS_AMQP_*,
// SOUS_SERVICEBUS_*), and builds the AMQP TLS configuration from them, so
// that both binaries accept and refuse the same values with the same
// messages. Each error is a *VarError naming the variable to fix; the
// binaries exit 2 on one.
package brokerconfig

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/sous-run/sous/internal/secret"
)

// VarError names the variable that is wrong and says what it must be.
type VarError struct {
	Var string
	Msg string
}

func (e *VarError) Error() string { return e.Var + ": " + e.Msg }

// Bad returns a *VarError for variable v.
func Bad(v, format string, args ...any) error {
	return &VarError{Var: v, Msg: fmt.Sprintf(format, args...)}
}

// AMQP is a RabbitMQ connection as configured.
type AMQP struct {
	URL       secret.Value  // SOUS_AMQP_URL
	CAFile    string        // SOUS_AMQP_CA_FILE
	CertFile  string        // SOUS_AMQP_CERT_FILE
	KeyFile   string        // SOUS_AMQP_KEY_FILE
	Heartbeat time.Duration // SOUS_AMQP_HEARTBEAT
}

// Check refuses a URL that is not amqp:// or amqps:// with a host, a
// client certificate without its key (or the reverse), and a heartbeat
// under a second. The URL never appears in the message.
func (a AMQP) Check() error {
	u, err := url.Parse(a.URL.Reveal())
	if err != nil || (u.Scheme != "amqp" && u.Scheme != "amqps") || u.Host == "" {
		return Bad("SOUS_AMQP_URL", "must be an amqp:// or amqps:// URL such as amqp://user:password@host:5672/vhost")
	}
	if (a.CertFile == "") != (a.KeyFile == "") {
		return Bad("SOUS_AMQP_CERT_FILE", "set SOUS_AMQP_CERT_FILE and SOUS_AMQP_KEY_FILE together for a client certificate")
	}
	if a.Heartbeat < time.Second {
		return Bad("SOUS_AMQP_HEARTBEAT", "must be at least 1s")
	}
	return nil
}

// TLS returns the TLS configuration for the connection: nil (the
// defaults, for amqps:// with the system's roots) when neither a CA nor a
// client certificate is set.
func (a AMQP) TLS() (*tls.Config, error) {
	if a.CAFile == "" && a.CertFile == "" {
		return nil, nil
	}
	t := &tls.Config{MinVersion: tls.VersionTLS12}
	if a.CAFile != "" {
		pem, err := os.ReadFile(a.CAFile)
		if err != nil {
			return nil, Bad("SOUS_AMQP_CA_FILE", "cannot read: %v", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, Bad("SOUS_AMQP_CA_FILE", "holds no PEM certificate")
		}
		t.RootCAs = pool
	}
	if a.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(a.CertFile, a.KeyFile)
		if err != nil {
			return nil, Bad("SOUS_AMQP_CERT_FILE", "cannot load the client certificate and key: %v", err)
		}
		t.Certificates = []tls.Certificate{cert}
	}
	return t, nil
}

// ServiceBus is an Azure Service Bus namespace as configured.
type ServiceBus struct {
	ConnectionString secret.Value // SOUS_SERVICEBUS_CONNECTION_STRING
	Namespace        string       // SOUS_SERVICEBUS_NAMESPACE (workload identity)
}

// Check wants a connection string, or else a fully qualified namespace for
// workload identity. The connection string never appears in the message.
func (s ServiceBus) Check() error {
	if s.ConnectionString.IsZero() {
		switch {
		case s.Namespace == "":
			return Bad("SOUS_SERVICEBUS_CONNECTION_STRING", "set it (or SOUS_SERVICEBUS_NAMESPACE for workload identity) when SOUS_BROKER=servicebus")
		case strings.Contains(s.Namespace, "://") || !strings.Contains(s.Namespace, "."):
			return Bad("SOUS_SERVICEBUS_NAMESPACE", "must be a fully qualified host name such as myns.servicebus.windows.net")
		}
		return nil
	}
	if !strings.Contains(s.ConnectionString.Reveal(), "Endpoint=") {
		return Bad("SOUS_SERVICEBUS_CONNECTION_STRING", "is not a Service Bus connection string (Endpoint=sb://...;SharedAccessKeyName=...;SharedAccessKey=...)")
	}
	return nil
}

// SecretFile is a variable naming a file that holds a secret, and where
// the secret goes.
type SecretFile struct {
	Var  string // the *_FILE variable, for the message
	Path string
	Dst  *secret.Value
}

// ReadSecretFiles reads each file whose Path is set into its Dst, trimmed
// of surrounding space (a trailing newline, as editors and Kubernetes
// Secrets leave one).
func ReadSecretFiles(files ...SecretFile) error {
	for _, f := range files {
		if f.Path == "" {
			continue
		}
		b, err := os.ReadFile(f.Path)
		if err != nil {
			return Bad(f.Var, "cannot read the secret file: %v", err)
		}
		*f.Dst = secret.Value(strings.TrimSpace(string(b)))
	}
	return nil
}
