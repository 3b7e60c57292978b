package brokerconfig_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sous-run/sous/internal/brokerconfig"
	"github.com/sous-run/sous/internal/secret"
)

// wantVar fails unless err is a *VarError naming v that does not hold
// the secret.
func wantVar(t *testing.T, err error, v, secretText string) {
	t.Helper()
	var ve *brokerconfig.VarError
	if !errors.As(err, &ve) || ve.Var != v {
		t.Fatalf("error %v, want a *VarError naming %s", err, v)
	}
	if secretText != "" && strings.Contains(err.Error(), secretText) {
		t.Fatalf("error %q shows the secret", err)
	}
}

func TestAMQPCheck(t *testing.T) {
	ok := brokerconfig.AMQP{URL: "amqps://u:pw@broker:5671/vh", Heartbeat: 10 * time.Second}
	if err := ok.Check(); err != nil {
		t.Fatalf("Check(%+v) = %v", ok, err)
	}
	for _, tt := range []struct {
		name string
		a    brokerconfig.AMQP
		v    string
	}{
		{"http URL", brokerconfig.AMQP{URL: "http://u:hunter2@broker/", Heartbeat: time.Second}, "SOUS_AMQP_URL"},
		{"no host", brokerconfig.AMQP{URL: "amqp://", Heartbeat: time.Second}, "SOUS_AMQP_URL"},
		{"cert without key", brokerconfig.AMQP{URL: "amqps://b/", CertFile: "c.pem", Heartbeat: time.Second}, "SOUS_AMQP_CERT_FILE"},
		{"key without cert", brokerconfig.AMQP{URL: "amqps://b/", KeyFile: "k.pem", Heartbeat: time.Second}, "SOUS_AMQP_CERT_FILE"},
		{"heartbeat under 1s", brokerconfig.AMQP{URL: "amqp://b/", Heartbeat: 500 * time.Millisecond}, "SOUS_AMQP_HEARTBEAT"},
	} {
		t.Run(tt.name, func(t *testing.T) { wantVar(t, tt.a.Check(), tt.v, "hunter2") })
	}
}

func TestServiceBusCheck(t *testing.T) {
	for _, ok := range []brokerconfig.ServiceBus{
		{ConnectionString: "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=s3cret"},
		{Namespace: "ns.servicebus.windows.net"},
	} {
		if err := ok.Check(); err != nil {
			t.Fatalf("Check(%+v) = %v", ok, err)
		}
	}
	for _, tt := range []struct {
		name string
		s    brokerconfig.ServiceBus
		v    string
	}{
		{"neither", brokerconfig.ServiceBus{}, "SOUS_SERVICEBUS_CONNECTION_STRING"},
		{"not a connection string", brokerconfig.ServiceBus{ConnectionString: "SharedAccessKey=s3cret"}, "SOUS_SERVICEBUS_CONNECTION_STRING"},
		{"namespace with a scheme", brokerconfig.ServiceBus{Namespace: "sb://ns.servicebus.windows.net"}, "SOUS_SERVICEBUS_NAMESPACE"},
		{"bare namespace name", brokerconfig.ServiceBus{Namespace: "ns"}, "SOUS_SERVICEBUS_NAMESPACE"},
	} {
		t.Run(tt.name, func(t *testing.T) { wantVar(t, tt.s.Check(), tt.v, "s3cret") })
	}
}

// writePair writes a self-signed certificate and its key as PEM files.
func writePair(t *testing.T, dir string) (certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "sous test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		t.Fatal(err)
	}
	return certFile, keyFile
}

func TestAMQPTLS(t *testing.T) {
	dir := t.TempDir()
	cert, key := writePair(t, dir)
	if c, err := (brokerconfig.AMQP{}).TLS(); c != nil || err != nil {
		t.Fatalf("TLS() without files = %v, %v; want nil, nil (the defaults)", c, err)
	}
	c, err := brokerconfig.AMQP{CAFile: cert, CertFile: cert, KeyFile: key}.TLS()
	if err != nil {
		t.Fatal(err)
	}
	if c.RootCAs == nil || len(c.Certificates) != 1 || c.MinVersion < 0x0303 {
		t.Fatalf("TLS() = roots %v, %d certificates, min version %x; want the CA, the client pair, TLS 1.2+", c.RootCAs != nil, len(c.Certificates), c.MinVersion)
	}
	notPEM := filepath.Join(dir, "ca.txt")
	if err := os.WriteFile(notPEM, []byte("not a certificate"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = brokerconfig.AMQP{CAFile: notPEM}.TLS()
	wantVar(t, err, "SOUS_AMQP_CA_FILE", "")
	_, err = brokerconfig.AMQP{CAFile: filepath.Join(dir, "missing.pem")}.TLS()
	wantVar(t, err, "SOUS_AMQP_CA_FILE", "")
	_, err = brokerconfig.AMQP{CertFile: cert, KeyFile: cert}.TLS()
	wantVar(t, err, "SOUS_AMQP_CERT_FILE", "")
}

func TestReadSecretFiles(t *testing.T) {
	dir := t.TempDir()
	f := filepath.Join(dir, "url")
	if err := os.WriteFile(f, []byte("amqp://u:pw@b/\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var got, untouched secret.Value = "", "kept"
	err := brokerconfig.ReadSecretFiles(
		brokerconfig.SecretFile{Var: "SOUS_AMQP_URL_FILE", Path: f, Dst: &got},
		brokerconfig.SecretFile{Var: "SOUS_ENGINE_API_KEY_FILE", Dst: &untouched},
	)
	if err != nil || got.Reveal() != "amqp://u:pw@b/" || untouched.Reveal() != "kept" {
		t.Fatalf("ReadSecretFiles = %v; read %q (want it trimmed), unset one %q", err, got.Reveal(), untouched.Reveal())
	}
	err = brokerconfig.ReadSecretFiles(brokerconfig.SecretFile{Var: "SOUS_AMQP_URL_FILE", Path: filepath.Join(dir, "missing"), Dst: &got})
	wantVar(t, err, "SOUS_AMQP_URL_FILE", "")
}
