package brokerconfig_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/sous-run/sous/internal/brokerconfig"
)

func TestParse(t *testing.T) {
	var c struct {
		Wait time.Duration `env:"SOUS_TEST_WAIT" envDefault:"1s"`
		N    int           `env:"SOUS_TEST_N"`
	}
	if err := brokerconfig.Parse(&c, []string{"SOUS_TEST_N=3", "OTHER=x=y"}); err != nil || c.N != 3 || c.Wait != time.Second {
		t.Fatalf("%+v, %v", c, err)
	}
	err := brokerconfig.Parse(&c, []string{"SOUS_TEST_N=hunter2"})
	var ve *brokerconfig.VarError
	if !errors.As(err, &ve) || ve.Var != "SOUS_TEST_N" || strings.Contains(err.Error(), "hunter2") {
		t.Fatalf("a bad value: %v, want a VarError naming SOUS_TEST_N without the value", err)
	}
}
