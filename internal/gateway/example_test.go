package gateway_test

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"

	"github.com/sous-run/sous/internal/gateway"
)

// A keys file holds the SHA-256 of each key, never the key.
func ExampleParseKeys() {
	sum := sha256.Sum256([]byte("sk-team-a"))
	file := "# name  sha256(key)  [models=…] [rate=requests per second]\n" +
		"team-a " + hex.EncodeToString(sum[:]) + " models=llama3.2 rate=5\n"
	keys, err := gateway.ParseKeys([]byte(file), 0)
	if err != nil {
		fmt.Println(err)
		return
	}
	k := keys[0]
	fmt.Println(k.Name, k.Models, k.Rate, k.Allows("llama3.2"), k.Allows("qwen2.5"))
	// Output: team-a [llama3.2] 5 true false
}
