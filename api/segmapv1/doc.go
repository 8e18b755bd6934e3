// Package segmapv1 holds the gRPC services generated from admin.proto (the
// admin API the CLI uses, served by internal/rpc/adminapi) and
// mapping.proto (the controller-agent protocol of internal/rpc/protocol,
// carried by internal/rpc/transport). Everything but this file is
// generated: edit the .proto files and regenerate.
package segmapv1
