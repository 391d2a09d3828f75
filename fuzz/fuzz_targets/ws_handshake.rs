//! The upstream WebSocket handshake response, as the shard's client reads
//! it (tungstenite's client handshake, which async-tungstenite drives):
//! the fuzz input is everything the "PDS" answers.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::io::{Read, Write};

struct Peer<'a> {
    answer: &'a [u8],
}

impl Read for Peer<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // Small reads: every split point of the answer gets exercised.
        let n = buf.len().min(self.answer.len()).min(7);
        buf[..n].copy_from_slice(&self.answer[..n]);
        self.answer = &self.answer[n..];
        Ok(n)
    }
}

impl Write for Peer<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let url = "ws://pds.example/xrpc/com.atproto.sync.subscribeRepos?cursor=1";
    if let Ok((mut ws, _)) = tungstenite::client::client(url, Peer { answer: data }) {
        // What follows the 101 is read as frames.
        for _ in 0..64 {
            if ws.read().is_err() {
                break;
            }
        }
    }
});
