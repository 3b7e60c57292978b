package gateway

import (
	"encoding/base64"
	"encoding/binary"
	"math"

	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/wire"
)

// The response bodies of OpenAI's API.

type usage struct {
	PromptTokens     int `json:"prompt_tokens"`
	CompletionTokens int `json:"completion_tokens"`
	TotalTokens      int `json:"total_tokens"`
}

type chatCompletion struct {
	ID                string       `json:"id"`
	Object            string       `json:"object"` // chat.completion
	Created           int64        `json:"created"`
	Model             string       `json:"model"`
	Choices           []chatChoice `json:"choices"`
	Usage             usage        `json:"usage"`
	SystemFingerprint *string      `json:"system_fingerprint"`
}

type chatChoice struct {
	Index        int          `json:"index"`
	Message      assistantMsg `json:"message"`
	Logprobs     *struct{}    `json:"logprobs"`
	FinishReason string       `json:"finish_reason"`
}

type assistantMsg struct {
	Role string `json:"role"`
	// Content is null in an answer that only calls tools, as OpenAI sends.
	Content   *string       `json:"content"`
	Refusal   *string       `json:"refusal"`
	ToolCalls []outToolCall `json:"tool_calls,omitempty"`
}

type chatChunk struct {
	ID                string            `json:"id"`
	Object            string            `json:"object"` // chat.completion.chunk
	Created           int64             `json:"created"`
	Model             string            `json:"model"`
	SystemFingerprint *string           `json:"system_fingerprint"`
	Choices           []chatChunkChoice `json:"choices"`
	// Usage is null on every chunk but the last when the client asked for
	// it (stream_options.include_usage), and absent otherwise.
	// Holds nil (absent), a nil *usage (null) or a *usage.
	Usage any `json:"usage,omitempty"`
}

type chatChunkChoice struct {
	Index        int       `json:"index"`
	Delta        delta     `json:"delta"`
	Logprobs     *struct{} `json:"logprobs"`
	FinishReason *string   `json:"finish_reason"`
}

type delta struct {
	Role      string        `json:"role,omitempty"`
	Content   *string       `json:"content,omitempty"`
	ToolCalls []outToolCall `json:"tool_calls,omitempty"`
}

type textCompletion struct {
	ID                string       `json:"id"`
	Object            string       `json:"object"` // text_completion
	Created           int64        `json:"created"`
	Model             string       `json:"model"`
	SystemFingerprint *string      `json:"system_fingerprint"`
	Choices           []textChoice `json:"choices"`
	Usage             *usage       `json:"usage,omitempty"`
}

type textChoice struct {
	Text         string    `json:"text"`
	Index        int       `json:"index"`
	Logprobs     *struct{} `json:"logprobs"`
	FinishReason *string   `json:"finish_reason"`
}

type embeddingList struct {
	Object string      `json:"object"` // list
	Data   []embedding `json:"data"`
	Model  string      `json:"model"`
	Usage  embedUsage  `json:"usage"`
}

type embedding struct {
	Object    string `json:"object"` // embedding
	Embedding any    `json:"embedding"`
	Index     int    `json:"index"`
}

type embedUsage struct {
	PromptTokens int `json:"prompt_tokens"`
	TotalTokens  int `json:"total_tokens"`
}

type modelList struct {
	Object string  `json:"object"` // list
	Data   []model `json:"data"`
}

type model struct {
	ID      string `json:"id"`
	Object  string `json:"object"` // model
	Created int64  `json:"created"`
	OwnedBy string `json:"owned_by"`
}

func usageOf(r *wire.Result) usage {
	if r.Usage == nil {
		return usage{}
	}
	return usage{PromptTokens: r.Usage.InputTokens, CompletionTokens: r.Usage.OutputTokens, TotalTokens: r.Usage.InputTokens + r.Usage.OutputTokens}
}

// finishReason maps the engine's done_reason onto OpenAI's values.
func finishReason(done string) string {
	switch done {
	case "length", inference.DoneToolCalls:
		return done
	}
	return "stop"
}

// base64Floats encodes a vector as OpenAI's base64 embedding: the
// little-endian float32s.
func base64Floats(v []float32) string {
	b := make([]byte, 4*len(v))
	for i, f := range v {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(f))
	}
	return base64.StdEncoding.EncodeToString(b)
}

// resultCalls are the tool calls of a chat result.
func resultCalls(r *wire.Result) []inference.ToolCall {
	if r.Message == nil {
		return nil
	}
	return r.Message.ToolCalls
}

func resultText(r *wire.Result) string {
	switch {
	case r.Message != nil:
		return r.Message.Content
	case r.Response != nil:
		return *r.Response
	}
	return ""
}
