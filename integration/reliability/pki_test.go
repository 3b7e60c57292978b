package reliability

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// pki is a throwaway certificate authority with a server certificate for
// 127.0.0.1 (and no host name, so "localhost" is a mismatch), a client
// certificate, and a second, unrelated CA
// (for the "wrong CA" case). Files are PEM; keys are SEC 1 EC keys, which
// both Go and Erlang's ssl read.
type pki struct {
	caFile                string
	serverCert, serverKey string
	clientCert, clientKey string
	otherCAFile           string
	otherCert, otherKey   string // a client certificate from the other CA
	ca                    *x509.Certificate
	caKey                 *ecdsa.PrivateKey
}

func newPKI(t testing.TB) *pki {
	t.Helper()
	dir := t.TempDir()
	p := &pki{}
	p.ca, p.caKey = newCA(t, "sous-test-ca")
	p.caFile = writePEM(t, dir, "ca.pem", "CERTIFICATE", p.ca.Raw)
	p.serverCert, p.serverKey = p.issue(t, dir, "server", p.ca, p.caKey, x509.ExtKeyUsageServerAuth)
	p.clientCert, p.clientKey = p.issue(t, dir, "client", p.ca, p.caKey, x509.ExtKeyUsageClientAuth)
	other, otherKey := newCA(t, "sous-test-other-ca")
	p.otherCAFile = writePEM(t, dir, "other-ca.pem", "CERTIFICATE", other.Raw)
	p.otherCert, p.otherKey = p.issue(t, dir, "other-client", other, otherKey, x509.ExtKeyUsageClientAuth)
	return p
}

func newCA(t testing.TB, cn string) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	must(t, err)
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(time.Now().UnixNano()),
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	must(t, err)
	cert, err := x509.ParseCertificate(der)
	must(t, err)
	return cert, key
}

func (p *pki) issue(t testing.TB, dir, name string, ca *x509.Certificate, caKey *ecdsa.PrivateKey, usage x509.ExtKeyUsage) (certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	must(t, err)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: "sous-test-" + name},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{usage},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	must(t, err)
	kder, err := x509.MarshalECPrivateKey(key)
	must(t, err)
	return writePEM(t, dir, name+".pem", "CERTIFICATE", der), writePEM(t, dir, name+"-key.pem", "EC PRIVATE KEY", kder)
}

func writePEM(t testing.TB, dir, name, typ string, der []byte) string {
	t.Helper()
	path := filepath.Join(dir, name)
	must(t, os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600))
	return path
}

// clientTLS is the test's own TLS configuration for talking to the node.
func (p *pki) clientTLS(t testing.TB) *tls.Config {
	t.Helper()
	pool := x509.NewCertPool()
	pool.AddCert(p.ca)
	cert, err := tls.LoadX509KeyPair(p.clientCert, p.clientKey)
	must(t, err)
	return &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12}
}
