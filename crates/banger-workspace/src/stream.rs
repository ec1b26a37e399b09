//! The byte stream of the `vm.workspace.*` methods, after their response
//! line: `kind u8 | length u32 (big-endian) | payload` frames (the kinds,
//! their limits and the order of a conversation are in
//! [`banger_proto::workspace`]).
//!
//! 1. [`read_frame`] reads one frame and refuses, before allocating, a
//!    payload over its kind's limit; an unknown kind is an error.
//! 2. [`write_data`] splits bytes into `Data` frames of at most
//!    [`MAX_DATA_FRAME`]; [`write_end`] and [`write_error`] send the closing
//!    frame and flush.
//!
//! Nothing here trusts the peer: either side may be a hostile process.

use std::io;

use banger_proto::workspace::{FrameKind, MAX_DATA_FRAME};
use banger_proto::RpcError;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("Workspace stream I/O failed")]
    Io(#[source] io::Error),
    #[error("The workspace stream ended in the middle of a frame")]
    Truncated,
    #[error("The workspace stream ended before its closing frame")]
    Ended,
    #[error("Unknown workspace frame kind {kind}")]
    UnknownKind { kind: u8 },
    #[error("A workspace {kind:?} frame of {length} bytes is over the limit of {limit}")]
    TooLarge {
        kind: FrameKind,
        length: u32,
        limit: u32,
    },
    #[error("A workspace {kind:?} frame is not the expected JSON")]
    Decode {
        kind: FrameKind,
        #[source]
        source: serde_json::Error,
    },
    #[error("Unexpected workspace {kind:?} frame")]
    Unexpected { kind: FrameKind },
}

/// One frame as read.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Data(Vec<u8>),
    /// The JSON payload, decoded by [`Frame::decode_end`].
    End(Vec<u8>),
    Error(RpcError),
}

impl Frame {
    /// The `End` payload as `T`; any other frame is unexpected.
    pub fn decode_end<T: DeserializeOwned>(self) -> Result<Result<T, RpcError>, StreamError> {
        match self {
            Self::End(payload) => {
                serde_json::from_slice(&payload)
                    .map(Ok)
                    .map_err(|source| StreamError::Decode {
                        kind: FrameKind::End,
                        source,
                    })
            }
            Self::Error(error) => Ok(Err(error)),
            Self::Data(_) => Err(StreamError::Unexpected {
                kind: FrameKind::Data,
            }),
        }
    }
}

/// Reads one frame; `None` on a clean end of stream between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<Option<Frame>, StreamError> {
    let mut header = [0_u8; 5];
    let mut filled = 0;
    while filled < header.len() {
        let read = reader
            .read(&mut header[filled..])
            .await
            .map_err(StreamError::Io)?;
        if read == 0 {
            return if filled == 0 {
                Ok(None)
            } else {
                Err(StreamError::Truncated)
            };
        }
        filled += read;
    }
    let kind =
        FrameKind::from_byte(header[0]).ok_or(StreamError::UnknownKind { kind: header[0] })?;
    let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    if length > kind.limit() {
        return Err(StreamError::TooLarge {
            kind,
            length,
            limit: kind.limit(),
        });
    }
    let mut payload = vec![0_u8; length as usize];
    reader
        .read_exact(&mut payload)
        .await
        .map_err(|error| match error.kind() {
            io::ErrorKind::UnexpectedEof => StreamError::Truncated,
            _ => StreamError::Io(error),
        })?;
    Ok(Some(match kind {
        FrameKind::Data => Frame::Data(payload),
        FrameKind::End => Frame::End(payload),
        FrameKind::Error => Frame::Error(serde_json::from_slice(&payload).map_err(|source| {
            StreamError::Decode {
                kind: FrameKind::Error,
                source,
            }
        })?),
    }))
}

/// Reads the closing frame of a stream that carries no data the other way.
pub async fn read_answer<R, T>(reader: &mut R) -> Result<Result<T, RpcError>, StreamError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    read_frame(reader)
        .await?
        .ok_or(StreamError::Ended)?
        .decode_end()
}

async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    kind: FrameKind,
    payload: &[u8],
) -> io::Result<()> {
    let length = u32::try_from(payload.len())
        .ok()
        .filter(|length| *length <= kind.limit())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a {kind:?} frame of {} bytes is over the limit",
                    payload.len()
                ),
            )
        })?;
    let mut header = [0_u8; 5];
    header[0] = kind.byte();
    header[1..].copy_from_slice(&length.to_be_bytes());
    writer.write_all(&header).await?;
    writer.write_all(payload).await
}

/// Sends `bytes` as `Data` frames (none for no bytes).
pub async fn write_data<W: AsyncWrite + Unpin>(writer: &mut W, bytes: &[u8]) -> io::Result<()> {
    for chunk in bytes.chunks(MAX_DATA_FRAME as usize) {
        write_frame(writer, FrameKind::Data, chunk).await?;
    }
    Ok(())
}

/// Sends the closing `End` frame and flushes.
pub async fn write_end<W: AsyncWrite + Unpin>(
    writer: &mut W,
    value: &impl Serialize,
) -> io::Result<()> {
    let payload = serde_json::to_vec(value).map_err(io::Error::other)?;
    write_frame(writer, FrameKind::End, &payload).await?;
    writer.flush().await
}

/// Sends the closing `Error` frame and flushes. A message too long for the
/// frame is cut.
pub async fn write_error<W: AsyncWrite + Unpin>(
    writer: &mut W,
    error: &RpcError,
) -> io::Result<()> {
    let mut error = error.clone();
    // Room for the code, the kind and the hint around the message.
    let room = FrameKind::Error.limit() as usize / 2;
    if error.message.len() > room {
        let mut end = room;
        while !error.message.is_char_boundary(end) {
            end -= 1;
        }
        error.message.truncate(end);
        error.message.push('…');
    }
    if let Some(data) = &mut error.data {
        if data.hint.as_ref().is_some_and(|hint| hint.len() > room / 2) {
            data.hint = None;
        }
    }
    let payload = serde_json::to_vec(&error).map_err(io::Error::other)?;
    write_frame(writer, FrameKind::Error, &payload).await?;
    writer.flush().await
}

/// Copies `reader` to `writer` as `Data` frames until `reader` ends;
/// returns the bytes copied. `progress` sees the running total.
pub async fn copy_as_data<R, W>(
    reader: &mut R,
    writer: &mut W,
    mut progress: impl FnMut(u64),
) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buffer = vec![0_u8; MAX_DATA_FRAME as usize];
    let mut total = 0_u64;
    loop {
        let read = reader.read(&mut buffer).await?;
        if read == 0 {
            return Ok(total);
        }
        write_frame(writer, FrameKind::Data, &buffer[..read]).await?;
        total += read as u64;
        progress(total);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_proto::workspace::{UploadTrailer, WorkspaceLink, MAX_END_FRAME};
    use banger_proto::ErrorKind;

    #[tokio::test]
    async fn frames_round_trip() {
        let mut wire = Vec::new();
        write_data(&mut wire, b"hello").await.unwrap();
        write_data(&mut wire, &[]).await.unwrap();
        let trailer = UploadTrailer {
            links: vec![WorkspaceLink {
                target: "/etc/hostname".into(),
                name: "link".into(),
            }],
            skipped: 2,
        };
        write_end(&mut wire, &trailer).await.unwrap();
        write_error(&mut wire, &RpcError::new(ErrorKind::Failed, "no"))
            .await
            .unwrap();
        let mut reader = wire.as_slice();
        assert_eq!(
            read_frame(&mut reader).await.unwrap(),
            Some(Frame::Data(b"hello".to_vec()))
        );
        let end = read_frame(&mut reader).await.unwrap().unwrap();
        assert_eq!(end.decode_end::<UploadTrailer>().unwrap(), Ok(trailer));
        let Some(Frame::Error(error)) = read_frame(&mut reader).await.unwrap() else {
            panic!("not an error frame");
        };
        assert_eq!(error.message, "no");
        assert_eq!(read_frame(&mut reader).await.unwrap(), None);
    }

    #[tokio::test]
    async fn big_data_is_split() {
        let bytes = vec![7_u8; MAX_DATA_FRAME as usize * 2 + 1];
        let mut wire = Vec::new();
        write_data(&mut wire, &bytes).await.unwrap();
        let mut reader = wire.as_slice();
        let mut sizes = Vec::new();
        while let Some(Frame::Data(chunk)) = read_frame(&mut reader).await.unwrap() {
            sizes.push(chunk.len());
        }
        assert_eq!(sizes, [MAX_DATA_FRAME as usize, MAX_DATA_FRAME as usize, 1]);
    }

    #[tokio::test]
    async fn hostile_frames_are_refused_before_allocation() {
        // A length far over the limit: refused from the header alone.
        let mut wire = vec![FrameKind::End.byte()];
        wire.extend_from_slice(&(MAX_END_FRAME + 1).to_be_bytes());
        let error = read_frame(&mut wire.as_slice()).await.unwrap_err();
        assert!(matches!(error, StreamError::TooLarge { .. }), "{error}");

        let mut wire = vec![FrameKind::Data.byte()];
        wire.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            read_frame(&mut wire.as_slice()).await.unwrap_err(),
            StreamError::TooLarge { .. }
        ));

        let wire = [9_u8, 0, 0, 0, 0];
        assert!(matches!(
            read_frame(&mut wire.as_slice()).await.unwrap_err(),
            StreamError::UnknownKind { kind: 9 }
        ));

        // Cut short, in the header and in the payload.
        assert!(matches!(
            read_frame(&mut [1_u8, 0].as_slice()).await.unwrap_err(),
            StreamError::Truncated
        ));
        assert!(matches!(
            read_frame(&mut [1_u8, 0, 0, 0, 4, 1].as_slice())
                .await
                .unwrap_err(),
            StreamError::Truncated
        ));

        // An error frame that is not an error.
        let wire = [3_u8, 0, 0, 0, 2, b'{', b'}'];
        assert!(matches!(
            read_frame(&mut wire.as_slice()).await.unwrap_err(),
            StreamError::Decode { .. }
        ));
    }

    #[tokio::test]
    async fn long_error_messages_are_cut_to_fit() {
        let mut wire = Vec::new();
        let long = "é".repeat(100_000);
        write_error(&mut wire, &RpcError::new(ErrorKind::Failed, long))
            .await
            .unwrap();
        let Some(Frame::Error(error)) = read_frame(&mut wire.as_slice()).await.unwrap() else {
            panic!("not an error frame");
        };
        assert!(error.message.ends_with('…'));
    }
}
